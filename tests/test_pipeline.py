"""The graph-builder API: building, chaining, fan-out/fan-in, and build-time validation."""
from __future__ import annotations

import polars as pl
import pytest

import streamfn as sf
from streamfn.connectors import memory
from streamfn.graph import render_mermaid, render_text


def rows(n: int) -> pl.DataFrame:
    return pl.DataFrame({"x": list(range(n))})


def test_decorated_stage_is_a_node_and_still_callable():
    p = sf.Pipeline("t")
    src = p.source(memory.source(rows(3)))

    @p.stage(src)
    def double(df):
        return df.with_columns(pl.col("x") * 2)

    assert isinstance(double, sf.Node) and double.kind == "stage"
    assert double(rows(2))["x"].to_list() == [0, 2]


def test_duplicate_names_are_rejected():
    p = sf.Pipeline("t")
    src = p.source(memory.source(rows(1)), name="a")
    with pytest.raises(sf.GraphError, match="already has a node named 'a'"):
        p.source(memory.source(rows(1)), name="a")
    src.stage(lambda df: df, name="s")
    with pytest.raises(sf.GraphError, match="already has a node named 's'"):
        src.stage(lambda df: df, name="s")


def test_unknown_upstream_is_reported_with_the_known_names():
    p = sf.Pipeline("t")
    p.source(memory.source(rows(1)), name="ticks")
    p.stage("tick")(lambda df: df)
    with pytest.raises(sf.GraphError, match=r"unknown upstream 'tick' \(known: ticks"):
        p.validate()


def test_cycle_is_reported_with_its_path():
    p = sf.Pipeline("t")
    src = p.source(memory.source(rows(1)), name="src")
    p.stage(src, "b", name="a")(lambda df: df)
    p.stage("a", name="b")(lambda df: df)
    with pytest.raises(sf.GraphError, match="cycle: a -> b -> a"):
        p.validate()


def test_stage_and_sink_need_an_upstream_and_a_pipeline_a_source():
    p = sf.Pipeline("t")
    with pytest.raises(sf.GraphError, match="has no upstream"):
        p.stage()(lambda df: df)
    with pytest.raises(sf.GraphError, match="sink 'memory_sink' has no upstream"):
        p.sink(memory.sink())
    with pytest.raises(sf.GraphError, match="has no source"):
        p.validate()


def test_wrong_arity_and_wrong_objects_are_rejected():
    p = sf.Pipeline("t")
    src = p.source(memory.source(rows(1)))
    with pytest.raises(sf.GraphError, match=r"must take \(df\); it takes \(a, b\)"):
        p.stage(src)(lambda a, b: a)
    with pytest.raises(sf.GraphError, match="takes a source connector"):
        p.source(memory.sink())  # type: ignore[arg-type]
    with pytest.raises(sf.GraphError, match="takes a sink connector"):
        src.sink(memory.source(rows(1)))  # type: ignore[arg-type]
    sink = src.sink(memory.sink())
    with pytest.raises(sf.GraphError, match="a sink .* has no output"):
        p.stage(sink)(lambda df: df)
    other = sf.Pipeline("other")
    with pytest.raises(sf.GraphError, match="belongs to pipeline 'other'"):
        p.stage(other.source(memory.source(rows(1))))(lambda df: df)
    with pytest.raises(sf.GraphError, match="engine must be"):
        p.stage(src, engine="tpu")  # type: ignore[arg-type]
    with pytest.raises(sf.GraphError, match="pipeline name"):
        sf.Pipeline("bad name!")


def test_fan_out_and_fan_in_run_every_row_through_every_path(run_dir):
    p = sf.Pipeline("fan", run_dir=run_dir)
    src = p.source(memory.source({"0": rows(10), "1": rows(5)}))
    evens = src.stage(lambda df: df.filter(pl.col("x") % 2 == 0).with_columns(path=pl.lit("even")), name="evens")
    odds = src.stage(lambda df: df.filter(pl.col("x") % 2 == 1).with_columns(path=pl.lit("odd")), name="odds")
    merged = p.stage(evens, odds, name="merged")(lambda df: df.with_columns(seen=pl.lit(True)))
    everything, only_evens = memory.sink(), memory.sink()
    merged.sink(everything)
    evens.sink(only_evens)
    summary = p.run(until_idle=True)
    out = everything.frame()
    assert out.height == 15 and out["seen"].all()
    assert sorted(out.filter(pl.col("path") == "even")["x"].to_list()) == [0, 0, 2, 2, 4, 4, 6, 8]
    assert only_evens.frame().height == 8
    assert summary.rows_in("merged") == 15 and summary.rows_out("merged") == 15
    assert summary.rows_out("memory") == 15


def test_graph_renders_as_text_and_mermaid():
    p = sf.Pipeline("g")
    src = p.source(memory.source(rows(1)), name="ticks")
    clean = src.stage(lambda df: df, name="clean")
    clean.sink(memory.sink(), name="out")
    text = render_text(p)
    assert text.splitlines()[0] == "pipeline g"
    assert "stage   clean  <- ticks" in text
    mermaid = render_mermaid(p)
    assert mermaid.startswith("flowchart LR")
    assert "n0 --> n1" in mermaid and "n1 --> n2" in mermaid
