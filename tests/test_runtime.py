"""The local runtime: lanes in parallel, order within a partition, dead letters, back-pressure."""
from __future__ import annotations

import json
import threading

import polars as pl
import pytest

import streamfn as sf
from streamfn.batch import Batch
from streamfn.connectors import memory
from streamfn.lane import StageOutputError
from tests.helpers import read_dead_letters


def frames(n: int, size: int, start: int = 0) -> list[pl.DataFrame]:
    return [pl.DataFrame({"x": list(range(start + i * size, start + (i + 1) * size))}) for i in range(n)]


def test_rows_keep_their_order_within_a_partition(run_dir):
    p = sf.Pipeline("order", run_dir=run_dir, threads=4)
    src = p.source(memory.source({str(k): frames(20, 50, start=k * 10_000) for k in range(4)}))
    seen: dict[str, list[int]] = {}
    lock = threading.Lock()

    @p.stage(src)
    def record(df):
        with lock:
            seen.setdefault(str(df["x"][0] // 10_000), []).extend(df["x"].to_list())
        return df

    record.sink(memory.sink())
    p.run(until_idle=True)
    for k in range(4):
        assert seen[str(k)] == list(range(k * 10_000, k * 10_000 + 1000))


def test_lanes_run_concurrently_on_threads(run_dir):
    # If the two lanes ran one after the other, the barrier would time out.
    barrier = threading.Barrier(2, timeout=10)
    p = sf.Pipeline("parallel", run_dir=run_dir, threads=2)
    src = p.source(memory.source({"a": frames(1, 3), "b": frames(1, 3)}))

    @p.stage(src)
    def meet(df):
        barrier.wait()
        return df.with_columns(thread=pl.lit(threading.current_thread().name))

    out = memory.sink()
    meet.sink(out)
    p.run(until_idle=True)
    assert out.frame()["thread"].n_unique() == 2


def test_a_raising_stage_dead_letters_only_the_bad_rows_with_their_offsets(run_dir):
    p = sf.Pipeline("dlq", run_dir=run_dir)
    src = p.source(memory.source({"p0": frames(3, 10)}))

    @p.stage(src)
    def invert(df):
        if (df["x"] % 7 == 3).any():
            raise ValueError("x % 7 == 3 is not allowed")
        return df.with_columns(y=pl.col("x") * 10)

    out = memory.sink()
    invert.sink(out)
    summary = p.run(until_idle=True)
    bad = [x for x in range(30) if x % 7 == 3]
    assert sorted(out.frame()["x"].to_list()) == [x for x in range(30) if x not in bad]
    letters = read_dead_letters(run_dir)
    assert sorted(int(d["offset"]) for d in letters) == bad
    assert {d["stage"] for d in letters} == {"invert"} and {d["partition"] for d in letters} == {"p0"}
    assert all(d["error"] == "ValueError: x % 7 == 3 is not allowed" for d in letters)
    assert sorted(json.loads(d["payload"])["x"] for d in letters) == bad
    assert summary.dead_letters == len(bad) and summary.nodes["invert"].errors == len(bad)


def test_rows_after_a_filter_are_dead_lettered_with_batch_offset_and_row(run_dir):
    p = sf.Pipeline("dlq2", run_dir=run_dir)
    src = p.source(memory.source(frames(1, 10)))
    odd = src.stage(lambda df: df.filter(pl.col("x") % 2 == 1), name="odd")

    @odd.stage()
    def fussy(df):
        if (df["x"] == 5).any():
            raise RuntimeError("five")
        return df

    fussy.sink(memory.sink())
    p.run(until_idle=True)
    [letter] = read_dead_letters(run_dir)
    assert (letter["offset"], letter["row"], json.loads(letter["payload"])) == ("0", 2, {"x": 5})


def test_returning_none_drops_the_batch_and_a_lazyframe_is_collected(run_dir):
    p = sf.Pipeline("none", run_dir=run_dir)
    src = p.source(memory.source(frames(4, 5)))
    kept = src.stage(lambda df: None if df["x"][0] == 5 else df.lazy().with_columns(z=pl.lit(1)), name="kept")
    out = memory.sink()
    kept.sink(out)
    summary = p.run(until_idle=True)
    assert sorted(out.frame()["x"].to_list()) == [x for x in range(20) if not 5 <= x < 10]
    assert summary.rows_out("kept") == 15


def test_a_stage_returning_the_wrong_type_stops_the_run_naming_the_stage(run_dir):
    p = sf.Pipeline("wrong", run_dir=run_dir)
    src = p.source(memory.source(frames(2, 5)))
    src.stage(lambda df: df.to_dicts(), name="to_dicts").sink(memory.sink())
    with pytest.raises(StageOutputError, match="stage 'to_dicts' failed on memory\\[0\\] at offset 0: returned list"):
        p.run(until_idle=True)


def test_too_many_dead_letters_stop_the_run(run_dir):
    p = sf.Pipeline("limit", run_dir=run_dir, max_dead_letters=3)
    src = p.source(memory.source(frames(1, 10)))
    src.stage(lambda df: df.with_columns(pl.col("x").map_elements(lambda v: 1 // 0, return_dtype=pl.Int64)),
              name="always").sink(memory.sink())
    with pytest.raises(sf.DeadLetterLimit, match="more than max_dead_letters=3"):
        p.run(until_idle=True)


class FlakySink(sf.Sink):
    """Refuses every other write with Backpressure; keeps what it accepts."""

    def __init__(self) -> None:
        self.refused = 0
        self.rows: list[int] = []
        self._lock = threading.Lock()

    def write(self, batch: Batch) -> None:
        with self._lock:
            if self.refused < 5:
                self.refused += 1
                raise sf.Backpressure(retry_after_s=0.001)
            self.rows += batch.frame["x"].to_list()

    def flush(self, checkpoint_id: str) -> None:
        pass


def test_backpressure_delays_but_loses_nothing(run_dir):
    p = sf.Pipeline("bp", run_dir=run_dir)
    sink = FlakySink()
    p.source(memory.source(frames(3, 4))).sink(sink)
    p.run(until_idle=True)
    assert sink.refused == 5 and sorted(sink.rows) == list(range(12))


def test_summary_counts_and_prints(run_dir):
    p = sf.Pipeline("sum", run_dir=run_dir)
    src = p.source(memory.source(frames(2, 10)), name="numbers")
    src.stage(lambda df: df.head(3), name="head3").sink(memory.sink(), name="out")
    summary = p.run(until_idle=True)
    assert (summary.rows_in("head3"), summary.rows_out("head3"), summary.rows_out("out")) == (20, 6, 6)
    text = str(summary)
    assert "head3" in text and "dead letters: 0" in text
    assert summary.to_dict()["nodes"]["numbers"]["rows_out"] == 20
