"""Keyed tables, stateful functions, running aggregates and stream-table joins."""
from __future__ import annotations

import json
import os

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import streamfn as sf
from streamfn.connectors import memory
from streamfn.stateful.checkpoint import Checkpointer, LaneTakenOver
from streamfn.stateful.store import KeyedTable


def test_table_get_put_delete_are_batch_joins():
    t = KeyedTable(["k"])
    t.put(pl.DataFrame({"k": ["a", "b", "a"], "v": [1, 2, 3]}))
    got = t.get(pl.DataFrame({"k": ["b", "zz", "a"]}))
    assert got.rows() == [("b", 2), ("zz", None), ("a", 3)]
    t.delete(pl.DataFrame({"k": ["a"]}))
    assert t.frame().rows() == [("b", 2)]


def test_table_ttl_expires_untouched_keys():
    now = [1000.0]
    t = KeyedTable(["k"], ttl_ms=10_000, clock=lambda: now[0])
    t.put(pl.DataFrame({"k": ["a"], "v": [1]}))
    now[0] += 5
    t.put(pl.DataFrame({"k": ["b"], "v": [2]}))
    now[0] += 6
    assert t.frame()["k"].to_list() == ["b"]


def test_schema_is_enforced():
    t = KeyedTable(["k"], schema={"k": pl.String, "v": pl.Int64})
    with pytest.raises(sf.ConfigError, match="not in the table's schema"):
        t.put(pl.DataFrame({"k": ["a"], "other": [1]}))


class _Lane:
    """The two attributes of a lane the checkpointer reads, for a store-level test."""

    def __init__(self, runner) -> None:
        class _Src:
            name = "s"
        self.source, self.partition, self.id, self.position = _Src(), "0", "s[0]", 0
        self.runners = {"stage": runner}


class _TableRunner(sf.StageRunner):
    def __init__(self, table: KeyedTable) -> None:
        self.table = table

    def process(self, frame, batch):
        return None

    def snapshot(self, checkpoint_id):
        return {"table": self.table.snapshot(checkpoint_id)}

    def restore(self, saved):
        self.table.restore(saved["table"])


def test_snapshots_are_incremental_and_restore_exactly(tmp_path):
    n = 100_000
    t = KeyedTable(["k"])
    t.put(pl.DataFrame({"k": np.arange(n), "v": np.zeros(n)}))
    ck = Checkpointer(str(tmp_path), pipeline="p", code_hash="h")
    lane = _Lane(_TableRunner(t))
    ck.save_lane(lane, "0001")
    changed = np.arange(0, n, 100)  # 1% of the keys
    t.put(pl.DataFrame({"k": changed, "v": np.ones(len(changed))}))
    t.delete(pl.DataFrame({"k": [1, 2]}))
    ck.save_lane(lane, "0002")
    manifest = json.loads((tmp_path / "s" / "0" / "manifests" / "000000000001.json").read_text())
    chain = manifest["stages"]["stage"]["table"]
    assert chain["base"]["rows"] == n
    assert [d["rows"] for d in chain["deltas"]] == [len(changed) + 2]
    written = sorted(os.listdir(tmp_path / "s" / "0" / "state"))
    assert len(written) == 2  # the base was not written again
    restored = KeyedTable(["k"])
    lane2 = _Lane(_TableRunner(restored))
    Checkpointer(str(tmp_path), pipeline="p", code_hash="h").restore_lane(lane2)
    assert restored.frame().sort("k").equals(t.frame().sort("k"))


def _run(stage_builder, data, run_dir, **kw):
    p = sf.Pipeline("st", run_dir=run_dir, threads=2)
    out = memory.sink()
    dead = memory.sink(name="dead")
    p.dead_letter(dead)
    stage_builder(p, p.source(memory.source(data, **kw), name="src")).sink(out)
    p.run(until_idle=True, handle_signals=False)
    return out.frame(), dead.frame()


def test_keyed_function_state_and_rollback_of_a_bad_row(run_dir):
    def build(p, src):
        @p.stage(src, state=sf.table(key="user", schema={"user": pl.String, "total": pl.Int64}))
        def running_total(df: pl.DataFrame, state) -> pl.DataFrame:
            if (df["amount"] < 0).any():
                raise ValueError("negative amount")
            sums = df.group_by("user", maintain_order=True).agg(pl.col("amount").sum())
            seen = state.get(sums.select("user"))
            new = sums.with_columns((pl.col("amount") + seen["total"].fill_null(0)).alias("total"))
            state.put(new.select("user", "total"))
            return new.select("user", "total")
        return running_total

    batches = [pl.DataFrame({"user": ["a", "b"], "amount": [1, 2]}),
               pl.DataFrame({"user": ["a", "a", "b"], "amount": [10, -5, 20]}),
               pl.DataFrame({"user": ["a"], "amount": [100]})]
    out, dead = _run(build, batches, run_dir)
    assert out.rows() == [("a", 1), ("b", 2), ("a", 11), ("b", 22), ("a", 111)]
    assert dead.height == 1 and "negative amount" in dead["error"][0]


def test_running_aggregate_emits_new_totals(run_dir):
    batches = [pl.DataFrame({"k": ["x", "y"], "v": [1.0, 2.0]}), pl.DataFrame({"k": ["x"], "v": [3.0]})]
    out, _ = _run(lambda p, s: s.aggregate(by="k", aggs=[pl.len().alias("n"), pl.col("v").mean().alias("m")]),
                  batches, run_dir)
    assert sorted(out.rows()) == [("x", 1, 1.0), ("x", 2, 2.0), ("y", 1, 2.0)]


def test_aggregate_refuses_what_cannot_be_kept_incrementally(run_dir):
    with pytest.raises(sf.GraphError, match="cannot be kept"):
        _run(lambda p, s: s.aggregate(by="k", aggs=[pl.col("v").median()]),
             [pl.DataFrame({"k": ["x"], "v": [1.0]})], run_dir)


def test_stream_table_join_uses_the_latest_row_per_key(run_dir):
    p = sf.Pipeline("join", run_dir=run_dir, threads=2)
    sentiment = p.source(memory.source(pl.DataFrame({"symbol": ["A", "B", "A"], "score": [0.1, 0.5, 0.9]})),
                         name="sentiment")
    out = memory.sink()
    ticks = p.source(memory.source(pl.DataFrame({"symbol": ["A", "B", "C"], "price": [1.0, 2.0, 3.0]})),
                     name="ticks")
    ticks.join(sentiment, on="symbol").sink(out)
    p.threads = 1  # one thread: lanes run in the order they were opened (sentiment first)
    p.run(until_idle=True, handle_signals=False)
    got = out.frame().sort("symbol")
    assert got.rows() == [("A", 1.0, 0.9), ("B", 2.0, 0.5), ("C", 3.0, None)]


def _fencing(url: str, storage: dict | None = None) -> None:
    old_owner = Checkpointer(url, pipeline="p", code_hash="h", storage_options=storage)
    t = KeyedTable(["k"])
    t.put(pl.DataFrame({"k": [1], "v": [1]}))
    old_lane = _Lane(_TableRunner(t))
    old_owner.restore_lane(old_lane)
    old_owner.save_lane(old_lane, "a-1")
    new_owner = Checkpointer(url, pipeline="p", code_hash="h", storage_options=storage)
    restored = KeyedTable(["k"])
    new_lane = _Lane(_TableRunner(restored))
    new_owner.restore_lane(new_lane)  # takes the partition over, continuing the numbering
    assert restored.frame().rows() == [(1, 1)]
    new_owner.save_lane(new_lane, "0-1")  # an id that sorts *before* the old owner's
    t.put(pl.DataFrame({"k": [2], "v": [2]}))  # the old owner, still running, reads on
    old_lane.position = 5
    with pytest.raises(LaneTakenOver, match="no longer owns"):
        old_owner.save_lane(old_lane, "a-2")
    latest = Checkpointer(url, pipeline="p", code_hash="h", storage_options=storage)
    assert latest._load("s", "0")[0]["checkpoint_id"] == "0-1"


def test_a_worker_that_lost_its_partition_cannot_overwrite_the_new_owner(tmp_path):
    _fencing(str(tmp_path))


def test_an_idle_lane_publishes_no_new_checkpoint(tmp_path):
    ck = Checkpointer(str(tmp_path), pipeline="p", code_hash="h")
    t = KeyedTable(["k"])
    t.put(pl.DataFrame({"k": [1], "v": [1]}))
    lane = _Lane(_TableRunner(t))
    ck.restore_lane(lane)
    ck.save_lane(lane, "1")
    ck.save_lane(lane, "2")  # nothing read, nothing changed
    assert os.listdir(tmp_path / "s" / "0" / "manifests") == ["000000000000.json"]
    lane.position = 3
    ck.save_lane(lane, "3")
    assert len(os.listdir(tmp_path / "s" / "0" / "manifests")) == 2
    assert len(os.listdir(tmp_path / "s" / "0" / "state")) == 1  # the table was written once


@pytest.mark.integration
def test_fencing_and_incremental_checkpoints_on_s3(s3_bucket):
    storage = {"endpoint_url": s3_bucket.endpoint, "key": "testing", "secret": "testing"}
    _fencing(s3_bucket.url("fence"), storage)


def _as_dict(frame: pl.DataFrame) -> dict:
    return {} if frame.height == 0 else dict(frame.select("k", "v").rows())


@settings(max_examples=40, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["put", "delete", "snapshot"]),
                              st.lists(st.integers(0, 30), max_size=8)), max_size=25))
def test_table_matches_a_dict_and_its_snapshot_chain_restores_it(ops):
    table, model, chain = KeyedTable(["k"]), {}, None
    for step, (op, keys) in enumerate(ops):
        if op == "put" and keys:
            table.put(pl.DataFrame({"k": keys, "v": [step] * len(keys)}))
            model.update({k: step for k in keys})
        elif op == "delete":
            table.delete(pl.DataFrame({"k": keys}, schema={"k": pl.Int64}))
            for k in keys:
                model.pop(k, None)
        else:
            chain = table.snapshot(str(step))
    assert _as_dict(table.frame()) == model
    if chain is not None:  # a chain of base + deltas rebuilds the table
        final = table.snapshot("end")
        again = KeyedTable(["k"])
        again.restore(final)
        assert _as_dict(again.frame()) == model


def test_join_table_survives_a_restart(run_dir):
    sentiment = pl.DataFrame({"symbol": ["A", "B"], "score": [0.1, 0.5]})
    ticks = pl.DataFrame({"symbol": ["A", "B", "A", "B"], "price": [1.0, 2.0, 3.0, 4.0]})
    outputs = []
    for seen in (2, 4):  # the second run resumes both sources: only the new ticks come, no table rows
        p = sf.Pipeline("join_restart", run_dir=run_dir, threads=1)
        table = p.source(memory.source(sentiment), name="sentiment")
        out = memory.sink()
        p.source(memory.source(ticks.head(seen)), name="ticks").join(table, on="symbol").sink(out)
        p.run(until_idle=True, handle_signals=False)
        outputs.append(out.frame().rows())
    assert outputs == [[("A", 1.0, 0.1), ("B", 2.0, 0.5)], [("A", 3.0, 0.1), ("B", 4.0, 0.5)]]
