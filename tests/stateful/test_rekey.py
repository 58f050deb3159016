"""Re-keying in a process: keys spread over a source's partitions still have their state in one place."""
from __future__ import annotations

import os
import uuid

import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import streamfn as sf
from streamfn.connectors import files, memory
from streamfn.stateful.keyhash import fnv1a, owners
from streamfn.stateful.keys import KeySplitError
from tests.stateful.crashing import Crash, CrashingSource
from tests.stateful.reference import AGGS, assert_same, expected, run_windows
from tests.stateful.test_checkpoint import run_with_crashes
from tests.stateful.test_crash import check, crash_and_recover, direct, ticks_frame
from tests.stateful.test_windows import SPECS, ticks

SETTINGS = settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _dir(tmp_path) -> str:
    return str(tmp_path / uuid.uuid4().hex)


def spread(df: pl.DataFrame, lanes: int, seed: int) -> dict[str, pl.DataFrame]:
    """Rows dealt at random to `lanes` partitions, each in the original (event-time) order."""
    lane = np.random.default_rng(seed).integers(0, lanes, df.height)
    return {str(i): df.filter(pl.Series(lane == i)) for i in range(lanes)}


def test_the_key_hash_is_fnv1a_and_spreads_keys():
    # published FNV-1a 64 test vectors: the owner of a key never depends on the polars version
    assert [hex(int(h)) for h in fnv1a(pl.Series(["", "a", "foobar"]))] == [
        "0xcbf29ce484222325", "0xaf63dc4c8601ec8c", "0x85944171f73967e8"]
    frame = pl.DataFrame({"k": [f"user-{i}" for i in range(4000)]})
    counts = owners(frame, ["k"], 4).value_counts()["count"]
    assert counts.len() == 4 and counts.min() > 800
    assert owners(frame.slice(7, 3), ["k"], 4).to_list() == owners(frame, ["k"], 4).slice(7, 3).to_list()


def test_the_same_key_in_two_partitions_is_re_keyed(tmp_path):
    df = ticks(1, 300, symbols=3)
    got, dead = run_windows({"0": df, "1": df}, sf.tumbling("100ms"), run_dir=_dir(tmp_path))
    assert dead.frame().height == 0
    assert_same(got, expected(pl.concat([df, df]), sf.tumbling("100ms")))


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.kind)
@SETTINGS
@given(seed=st.integers(0, 10_000), n=st.integers(1, 400), lanes=st.integers(2, 4),
       batch_rows=st.integers(3, 80), threads=st.integers(1, 4))
def test_windows_over_keys_spread_across_partitions(tmp_path, spec, seed, n, lanes, batch_rows, threads):
    df = ticks(seed, n, symbols=6)
    got, dead = run_windows(spread(df, lanes, seed), spec, run_dir=_dir(tmp_path), batch_rows=batch_rows,
                            threads=threads)
    assert dead.frame().height == 0
    assert_same(got, expected(df, spec))


@SETTINGS
@given(seed=st.integers(0, 10_000), n=st.integers(1, 300), lanes=st.integers(2, 4))
def test_aggregate_and_keyed_table_over_keys_spread_across_partitions(tmp_path, seed, n, lanes):
    df = ticks(seed, n, symbols=5)
    p = sf.Pipeline("agg", run_dir=_dir(tmp_path), threads=3)
    src = p.source(memory.source(spread(df, lanes, seed), batch_rows=17))
    totals, lasts = memory.sink(), memory.sink(name="lasts")
    src.aggregate(by="symbol", aggs=[pl.len().alias("n"), pl.col("volume").sum().alias("volume")]).sink(totals)

    @p.stage(src, state=sf.table(key="symbol", schema={"symbol": pl.String, "seen": pl.Int64}))
    def count_seen(frame: pl.DataFrame, state) -> pl.DataFrame:
        counts = frame.group_by("symbol").agg(pl.len().cast(pl.Int64).alias("new"))
        before = state.get(counts.select("symbol"))
        now = counts.with_columns((pl.col("new") + before["seen"].fill_null(0)).alias("seen"))
        state.put(now.select("symbol", "seen"))
        return now.select("symbol", "seen")

    count_seen.sink(lasts)
    p.run(until_idle=True, handle_signals=False)
    want = df.group_by("symbol").agg(pl.len().cast(pl.Int64).alias("n"), pl.col("volume").sum())
    # a key's running total only grows, so its largest is its final one: one lane held every row of it
    final = totals.frame().group_by("symbol").agg(pl.col("n").max(), pl.col("volume").max())
    assert final.sort("symbol").equals(want.sort("symbol").select(final.columns).cast(final.schema))
    seen = lasts.frame().group_by("symbol").agg(pl.col("seen").max())
    assert seen.sort("symbol").rows() == want.sort("symbol").select("symbol", "n").rows()


def test_late_records_of_a_re_keyed_window_are_dead_letters_with_their_offset(tmp_path):
    lane0 = pl.DataFrame({"symbol": ["A", "B", "A", "B"], "ts": [10, 20, 500, 30],  # 30: late
                          "price": [1.0] * 4, "volume": [1] * 4})
    lane1 = pl.DataFrame({"symbol": ["B", "A"], "ts": [600, 700], "price": [1.0, 1.0], "volume": [1, 1]})
    got, dead = run_windows({"0": lane0, "1": lane1}, sf.tumbling("100ms"), run_dir=_dir(tmp_path))
    letters = dead.frame()
    assert letters.height == 1 and letters["offset"][0] == "3" and letters["partition"][0] == "0"
    assert "late" in letters["error"][0]
    assert_same(got, expected(pl.concat([lane0.head(3), lane1]), sf.tumbling("100ms")))


def test_a_source_partitioned_by_the_key_is_not_re_keyed_and_guarded(tmp_path):
    df = ticks(1, 50, symbols=2)
    source = memory.source({"0": df, "1": df})
    source.partitioned_by = ("symbol",)  # the source says so: per-lane state, the guard checks it
    p = sf.Pipeline("w", run_dir=_dir(tmp_path), threads=2)
    p.source(source).window(sf.tumbling("100ms"), by="symbol", on="ts", aggs=AGGS).sink(memory.sink())
    with pytest.raises(KeySplitError, match="arrives in lanes"):
        p.run(until_idle=True, handle_signals=False)


@pytest.mark.parametrize("spec", [sf.tumbling("100ms"), sf.session("7ms")], ids=lambda s: s.kind)
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10_000), n=st.integers(20, 300), batch_rows=st.integers(5, 60),
       crashes=st.lists(st.integers(0, 6), min_size=1, max_size=3), lanes=st.integers(2, 3))
def test_re_keyed_state_survives_crashes_exactly_once(tmp_path, spec, seed, n, batch_rows, crashes, lanes):
    df = ticks(seed, n, symbols=5)
    got = run_with_crashes(spread(df, lanes, seed), spec, _dir(tmp_path), crashes, batch_rows)
    assert_same(got, expected(df, spec))


def test_a_crashed_batch_breaks_the_group_and_the_restart_resumes(tmp_path):
    df = ticks(5, 200, symbols=4)
    run_dir = _dir(tmp_path)
    p = sf.Pipeline("ck", run_dir=run_dir, checkpoint_interval=0, threads=2)
    out = memory.sink()
    p.source(CrashingSource(spread(df, 2, 5), fail_after=3, batch_rows=20), name="ticks").window(
        sf.tumbling("100ms"), by="symbol", on="ts", aggs=AGGS).sink(out)
    with pytest.raises(Crash):
        p.run(until_idle=True, handle_signals=False)
    manifests = os.listdir(os.path.join(run_dir, "checkpoints", "ticks", "%23keyed", "manifests"))
    assert manifests  # one manifest for the group, none per lane
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints", "ticks"))) == ["%23keyed"]


def write_spread_ticks(folder: str, n: int = 60_000, parts: int = 3) -> pl.DataFrame:
    """Ticks in event-time order dealt round-robin to files: every symbol is in every file."""
    df = ticks_frame(n, seed=7)
    os.makedirs(folder, exist_ok=True)
    for i in range(parts):
        df.gather_every(parts, offset=i).write_ndjson(os.path.join(folder, f"ticks-{i}.jsonl"))
    return df


def test_files_with_keys_spread_across_them_equal_polars(tmp_path):
    df = write_spread_ticks(str(tmp_path / "in"), n=20_000)
    p = sf.Pipeline("files", run_dir=str(tmp_path / "run"), batch_rows=700, threads=3)
    ticks_node = p.source(files.ndjson(str(tmp_path / "in" / "*.jsonl"),
                                       schema={"symbol": pl.String, "ts": pl.Int64, "price": pl.Float64,
                                               "volume": pl.Int64}))
    traded = ticks_node.stage(lambda f: f.filter(pl.col("volume") > 0), name="traded")
    traded.window(sf.tumbling("1s"), by="symbol", on="ts", aggs=[
        pl.len().alias("count"), pl.col("volume").sum().alias("volume"),
        ((pl.col("price") * pl.col("volume")).sum() / pl.col("volume").sum()).alias("vwap"),
    ]).sink(files.parquet(str(tmp_path / "out")))
    p.run(until_idle=True, handle_signals=False)
    got = pl.read_parquet(str(tmp_path / "out" / "*.parquet"))
    want = direct(df)
    assert got.height == want.height
    check(got, want)


@pytest.mark.integration
def test_kill_9_and_restart_with_keys_spread_across_files(tmp_path):
    tmp = str(tmp_path)
    df = write_spread_ticks(os.path.join(tmp, "in"))
    got = crash_and_recover(tmp, os.path.join(tmp, "checkpoints"), {"state.key_lanes": "3"}, kills=3)
    check(got, direct(df))
    assert os.listdir(os.path.join(tmp, "checkpoints", "ticks")) == ["%23keyed"]


def test_per_lane_state_is_not_restored_into_a_re_keyed_run(tmp_path):
    df = ticks(3, 100, symbols=3)
    run_dir = _dir(tmp_path)
    run_windows({"0": df}, sf.tumbling("100ms"), run_dir=run_dir)  # one partition: state per lane
    with pytest.raises(sf.ConfigError, match="holds state per lane"):
        run_windows({"0": df, "1": df}, sf.tumbling("100ms"), run_dir=run_dir)
