"""Checkpoints: a crashed run restarted from its checkpoint gives what an uninterrupted run gives."""
from __future__ import annotations

import json
import os
import uuid

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import streamfn as sf
from streamfn.connectors import memory
from streamfn.stateful.checkpoint import StateMismatch
from tests.stateful.crashing import Crash, CrashingSource
from tests.stateful.reference import AGGS, assert_same, expected
from tests.stateful.test_windows import SPECS, ticks


def build(source, run_dir: str, spec, *, checkpoint: str | None = None, aggs=AGGS):
    p = sf.Pipeline("ck", run_dir=run_dir, checkpoint=checkpoint, checkpoint_interval=0, threads=2)
    out = memory.sink()
    p.source(source, name="ticks").window(spec, by="symbol", on="ts", aggs=aggs).sink(out)
    return p, out


def run_with_crashes(data, spec, run_dir: str, crash_points: list[int], batch_rows: int,
                     checkpoint: str | None = None) -> pl.DataFrame:
    """Run, crash after each number of batches in crash_points, restart; return all flushed output."""
    outputs = []
    for fail_after in [*crash_points, None]:
        p, out = build(CrashingSource(data, fail_after=fail_after, batch_rows=batch_rows), run_dir, spec,
                       checkpoint=checkpoint)
        try:
            p.run(until_idle=True, handle_signals=False)
        except Crash:  # a partition shorter than fail_after batches ends before it crashes
            assert fail_after is not None
        outputs.append(out.frame())
    frames = [f for f in outputs if f.height]
    return pl.concat(frames) if frames else pl.DataFrame()


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.kind)
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10_000), n=st.integers(20, 300), batch_rows=st.integers(5, 60),
       crashes=st.lists(st.integers(0, 6), min_size=1, max_size=3), lanes=st.integers(1, 3))
def test_restore_after_crashes_equals_an_uninterrupted_run(tmp_path, spec, seed, n, batch_rows, crashes, lanes):
    df = ticks(seed, n, symbols=5)
    keyed = df.with_columns((pl.col("symbol").str.slice(1).cast(pl.Int64) % lanes).alias("lane"))
    data = {str(i): keyed.filter(pl.col("lane") == i).drop("lane") for i in range(lanes)}
    got = run_with_crashes(data, spec, str(tmp_path / uuid.uuid4().hex), crashes, batch_rows)
    assert_same(got, expected(df, spec))


def test_memory_url_checkpoints(tmp_path):
    df = ticks(3, 300)
    url = f"memory://ck-{uuid.uuid4().hex}"
    got = run_with_crashes(df, sf.tumbling("100ms"), str(tmp_path / "r"), [2, 3], 40, checkpoint=url)
    assert_same(got, expected(df, sf.tumbling("100ms")))


def _json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _manifests(run_dir: str) -> list[str]:
    base = os.path.join(run_dir, "checkpoints", "ticks", "0", "manifests")
    return sorted(os.listdir(base))


def test_keeps_the_last_k_and_deletes_unreferenced_state(tmp_path):
    run_dir = str(tmp_path / "r")
    p, _ = build(memory.source(ticks(1, 400), batch_rows=20), run_dir, sf.tumbling("100ms"))
    p.run(until_idle=True, handle_signals=False, settings={"checkpoint.keep": "2"})
    names = _manifests(run_dir)
    assert len(names) == 2
    base = os.path.join(run_dir, "checkpoints", "ticks", "0")
    referenced = set()
    for name in names:
        referenced |= set(_json(os.path.join(base, "manifests", name))["files"])
    assert {f"state/{f}" for f in os.listdir(os.path.join(base, "state"))} == referenced


def test_corrupt_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    run_dir = str(tmp_path / "r")
    df = ticks(5, 300)
    spec = sf.tumbling("100ms")
    p, out1 = build(CrashingSource(df, fail_after=4, batch_rows=30), run_dir, spec)
    with pytest.raises(Crash):
        p.run(until_idle=True, handle_signals=False)
    base = os.path.join(run_dir, "checkpoints", "ticks", "0")
    latest = _json(os.path.join(base, "manifests", _manifests(run_dir)[-1]))
    for rel in latest["files"]:
        with open(os.path.join(base, rel), "r+b") as f:
            f.seek(8)
            f.write(b"garbage!")
    p, out2 = build(CrashingSource(df, fail_after=None, batch_rows=30), run_dir, spec)
    p.run(until_idle=True, handle_signals=False)
    assert "checkpoint is corrupt" in caplog.text
    # the previous checkpoint is older: windows between it and the crash are replayed, none lost
    merged = pl.concat([out1.frame(), out2.frame()]).unique(subset=["symbol", "window_start"], keep="last")
    assert_same(merged, expected(df, spec))


def test_changed_state_code_is_refused_then_reset(tmp_path):
    run_dir = str(tmp_path / "r")
    df = ticks(2, 100)
    p, _ = build(memory.source(df, batch_rows=30), run_dir, sf.tumbling("100ms"))
    p.run(until_idle=True, handle_signals=False)
    p, out = build(memory.source(df, batch_rows=30), run_dir, sf.tumbling("200ms"))
    with pytest.raises(StateMismatch, match="--reset-state"):
        p.run(until_idle=True, handle_signals=False)
    p, out = build(memory.source(df, batch_rows=30), run_dir, sf.tumbling("200ms"))
    p.run(until_idle=True, handle_signals=False, settings={"state.reset": "1"})
    assert_same(out.frame(), expected(df, sf.tumbling("200ms")))


def test_checkpoint_setting_overrides_the_pipeline(tmp_path):
    run_dir = str(tmp_path / "r")
    elsewhere = str(tmp_path / "elsewhere")
    p, _ = build(memory.source(ticks(2, 100), batch_rows=30), run_dir, sf.tumbling("100ms"))
    p.run(until_idle=True, handle_signals=False, settings={"checkpoint": elsewhere})
    assert os.listdir(os.path.join(elsewhere, "ticks", "0", "manifests"))
    assert not os.path.exists(os.path.join(run_dir, "checkpoints"))


class _Recording(CrashingSource):
    """Records, at each commit, the position in the newest published manifest of the lane."""

    def __init__(self, data, run_dir: str) -> None:
        super().__init__(data, fail_after=None, batch_rows=25)
        self.run_dir, self.seen = run_dir, []

    def open(self, partition, resume):
        inner, source = super().open(partition, resume), self

        class Partition(type(inner)):  # the same reader, plus a look at the manifests on commit
            def commit(self, position):
                names = _manifests(source.run_dir)
                base = os.path.join(source.run_dir, "checkpoints", "ticks", "0", "manifests")
                source.seen.append((position, _json(os.path.join(base, names[-1]))["position"]))

        inner.__class__ = Partition
        return inner


def test_the_source_commits_only_positions_a_published_manifest_holds(tmp_path):
    run_dir = str(tmp_path / "r")
    source = _Recording(ticks(4, 200), run_dir)
    p, _ = build(source, run_dir, sf.tumbling("100ms"))
    p.run(until_idle=True, handle_signals=False)
    assert len(source.seen) >= 8
    assert all(committed == published for committed, published in source.seen)
