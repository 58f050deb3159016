"""Window results equal a direct polars computation, whatever the batches, lanes and arrival order."""
from __future__ import annotations

import uuid

import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import streamfn as sf
from tests.stateful.reference import assert_same, expected, run_windows

SPECS = [sf.tumbling("100ms"), sf.hopping("100ms", "30ms"), sf.session("7ms"), sf.sliding("25ms")]
SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def ticks(seed: int, n: int, symbols: int = 4, span_ms: int = 600) -> pl.DataFrame:
    """Random ticks in event-time order (ties included)."""
    rng = np.random.default_rng(seed)
    return pl.DataFrame({
        "symbol": [f"S{i}" for i in rng.integers(0, symbols, n)],
        "ts": np.sort(rng.integers(0, span_ms, n)).astype(np.int64),
        "price": np.round(rng.uniform(10, 20, n), 4),
        "volume": rng.integers(1, 100, n),
    })


def _dir(tmp_path) -> str:
    return str(tmp_path / uuid.uuid4().hex)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.kind)
@SETTINGS
@given(seed=st.integers(0, 10_000), n=st.integers(1, 400), batch_rows=st.integers(1, 120))
def test_independent_of_batch_boundaries(tmp_path, spec, seed, n, batch_rows):
    df = ticks(seed, n)
    got, dead = run_windows(df, spec, run_dir=_dir(tmp_path), batch_rows=batch_rows)
    assert dead.frame().height == 0
    assert_same(got, expected(df, spec))


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.kind)
@SETTINGS
@given(seed=st.integers(0, 10_000), n=st.integers(1, 400), batch_rows=st.integers(1, 120),
       lateness=st.integers(0, 50))
def test_independent_of_arrival_order_within_lateness(tmp_path, spec, seed, n, batch_rows, lateness):
    df = ticks(seed, n)
    rng = np.random.default_rng(seed + 1)
    # arrival order: by ts plus a delay under `lateness`, so no record is further behind than that
    delay = rng.integers(0, lateness + 1, n) if lateness else np.zeros(n, dtype=np.int64)
    shuffled = df.with_columns(pl.Series("arrive", df["ts"].to_numpy() + delay)).sort("arrive").drop("arrive")
    got, dead = run_windows(shuffled, spec, run_dir=_dir(tmp_path), batch_rows=batch_rows,
                            allowed_lateness=f"{lateness}ms")
    assert dead.frame().height == 0
    assert_same(got, expected(df, spec))


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.kind)
@SETTINGS
@given(seed=st.integers(0, 10_000), n=st.integers(1, 400), lanes=st.integers(1, 4))
def test_independent_of_number_of_lanes(tmp_path, spec, seed, n, lanes):
    df = ticks(seed, n, symbols=6)
    part = df.with_columns((pl.col("symbol").str.slice(1).cast(pl.Int64) % lanes).alias("lane"))
    data = {str(i): part.filter(pl.col("lane") == i).drop("lane") for i in range(lanes)}
    got, _ = run_windows(data, spec, run_dir=_dir(tmp_path), batch_rows=50)
    assert_same(got, expected(df, spec))


def test_late_records_go_to_dead_letters_with_the_reason(tmp_path):
    df = pl.DataFrame({"symbol": ["A", "A", "A", "A"], "ts": [10, 250, 20, 260],
                       "price": [1.0, 2.0, 3.0, 4.0], "volume": [1, 1, 1, 1]})
    got, dead = run_windows(df, sf.tumbling("100ms"), run_dir=_dir(tmp_path), allowed_lateness="50ms")
    letters = dead.frame()
    assert letters.height == 1
    assert letters["offset"].to_list() == ["2"]
    assert "late: event time 20 ms is behind the watermark 200 ms" in letters["error"][0]
    assert sorted(zip(got["window_start"], got["count"])) == [(0, 1), (200, 2)]


def test_records_without_event_time_are_dead_letters(tmp_path):
    df = pl.DataFrame({"symbol": ["A", "A"], "ts": [10, None], "price": [1.0, 2.0], "volume": [1, 1]})
    got, dead = run_windows(df, sf.tumbling("100ms"), run_dir=_dir(tmp_path))
    assert dead.frame()["error"].to_list() == ["no event time: column 'ts' is null, so no window can hold "
                                               "the record"]
    assert got["count"].to_list() == [1]


def test_windows_closed_at_the_end_of_a_run_stay_closed_in_the_next(tmp_path):
    from streamfn.connectors import memory

    run_dir = _dir(tmp_path)
    first = pl.DataFrame({"k": ["a", "a"], "ts": [10, 20], "v": [1, 1]})
    more = pl.DataFrame({"k": ["a", "a"], "ts": [30, 130], "v": [1, 1]})
    outputs = []
    for data in (first, pl.concat([first, more])):  # the second run resumes after the first two rows
        p = sf.Pipeline("again", run_dir=run_dir)
        out, dead = memory.sink(), memory.sink(name="dead")
        p.dead_letter(dead)
        p.source(memory.source(data)).window(sf.tumbling("100ms"), by="k", aggs=[pl.col("v").sum()]).sink(out)
        p.run(until_idle=True, handle_signals=False)
        letters = dead.frame()
        offsets = letters["offset"].to_list() if letters.height else []
        outputs.append((out.frame().select("window_start", "v").rows(), offsets))
    assert outputs == [([(0, 2)], []), ([(100, 1)], ["2"])]


def test_a_window_is_emitted_once_when_the_watermark_passes(tmp_path):
    import streamfn as sf
    from streamfn.connectors import memory

    p = sf.Pipeline("once", run_dir=_dir(tmp_path))
    batches = [pl.DataFrame({"k": ["a"], "ts": [t], "v": [1]}) for t in (0, 50, 120, 130, 260)]
    out = memory.sink()
    p.source(memory.source(batches)).window(sf.tumbling("100ms"), by="k", aggs=[pl.col("v").sum()]).sink(out)
    p.run(until_idle=True, handle_signals=False)
    emitted = [(b.frame["window_start"].to_list(), b.frame["v"].to_list()) for b in out.batches()]
    assert emitted == [([0], [2]), ([100], [2]), ([200], [1])]


def test_early_updates_then_one_final_row(tmp_path):
    from streamfn.connectors import memory

    p = sf.Pipeline("early", run_dir=_dir(tmp_path))
    batches = [pl.DataFrame({"k": ["a"], "ts": [t], "v": [1]}) for t in (0, 50, 120)]
    out = memory.sink()
    p.source(memory.source(batches)).window(sf.tumbling("100ms"), by="k", aggs=[pl.col("v").sum()],
                                            early=True).sink(out)
    p.run(until_idle=True, handle_signals=False)
    rows = out.frame().select("window_start", "v", "final").rows()
    assert rows == [(0, 1, False), (0, 2, False), (0, 2, True), (100, 1, False), (100, 1, True)]


def test_datetime_event_time_and_raw_aggregates(tmp_path):
    from datetime import datetime, timezone

    from streamfn.connectors import memory

    p = sf.Pipeline("dt", run_dir=_dir(tmp_path))
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    df = pl.DataFrame({"k": ["a", "a", "b"], "at": [t0, t0, t0], "v": [1.0, 5.0, 2.0]}).with_columns(
        pl.col("at").dt.offset_by("1s"))
    out = memory.sink()
    p.source(memory.source(df)).window(sf.tumbling("1m"), by="k", on="at",
                                       aggs=[pl.col("v").median().alias("med")]).sink(out)
    p.run(until_idle=True, handle_signals=False)
    got = out.frame().sort("k")
    assert got["med"].to_list() == [3.0, 2.0]
    assert got.schema["window_start"] == pl.Datetime("ms", "UTC")
    assert got["window_start"][0] == t0
