"""Re-keying across processes: a keyed stage behind a Kafka repartition topic."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import numpy as np
import polars as pl
import pytest

import streamfn as sf
from streamfn.connectors import kafka, memory
from tests.stateful.reference import AGGS, assert_same, expected, run_windows
from tests.stateful.test_crash import ROOT, check, direct, kill_and_restart, ticks_frame
from tests.stateful.test_windows import ticks

SCHEMA = {"symbol": pl.String, "ts": pl.Int64, "price": pl.Float64, "volume": pl.Int64}


def produce_partitions(bootstrap: str, topic: str, parts: dict[int, pl.DataFrame]) -> None:
    """Create the topic and write each frame's rows, in order, to its partition."""
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, num_partitions=len(parts), replication_factor=1)])[topic].result(10)
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20})
    for partition, frame in parts.items():
        for row in frame.to_dicts():
            producer.produce(topic, json.dumps(row).encode(), partition=partition)
            producer.poll(0)
    assert producer.flush(30) == 0


def disordered(seed: int, n: int, partitions: int) -> dict[int, pl.DataFrame]:
    """Ticks dealt to partitions at random, each partition's rows shuffled a little (some late)."""
    df = ticks(seed, n, symbols=5).with_row_index("id").with_columns(pl.col("id").cast(pl.Int64))
    rng = np.random.default_rng(seed)
    lane = rng.integers(0, partitions, df.height)
    parts = {}
    for p in range(partitions):
        part = df.filter(pl.Series(lane == p))
        jitter = rng.integers(0, 400, part.height)  # ms: up to 4 window sizes out of order
        parts[p] = part.with_columns(pl.Series("_k", part["ts"].to_numpy() + jitter)).sort("_k").drop("_k")
    return parts


def late_ids(dead: memory.MemorySink) -> list[int]:
    letters = dead.frame()
    if letters.height == 0:
        return []
    return sorted(json.loads(p)["id"] for p in letters["payload"].to_list())


def windows_through_kafka(server, parts: dict[int, pl.DataFrame], run_dir: str, *, lateness: str,
                          repartitions: int) -> tuple[pl.DataFrame, memory.MemorySink, sf.RunSummary]:
    topic = server.topic_name("rp")
    produce_partitions(server.bootstrap, topic, parts)
    p = sf.Pipeline("rp", run_dir=run_dir, batch_rows=37, checkpoint_interval="50ms")
    src = p.source(kafka.topic(topic, format="json", schema={**SCHEMA, "id": pl.Int64}, key="id",
                               group=f"g-{topic}"), name="ticks")
    out, dead = memory.sink(), memory.sink(name="dead")
    p.dead_letter(dead)
    src.window(sf.tumbling("100ms"), by="symbol", on="ts", aggs=AGGS, allowed_lateness=lateness).sink(out)
    summary = p.run(until_idle=True, handle_signals=False,
                    settings=server.run_settings(**{"state.repartition_partitions": str(repartitions)}))
    return out.frame(), dead, summary


@pytest.mark.parametrize("repartitions", [1, 4])
def test_windows_behind_a_repartition_topic_equal_the_in_process_exchange(kafka_tansu, tmp_path, repartitions):
    """Same windows and the same late records as re-keying in one process: lateness is decided by
    each source partition's own order, however the partitions interleave in the topic."""
    parts = disordered(seed=5, n=1500, partitions=3)
    got, dead, summary = windows_through_kafka(kafka_tansu, parts, str(tmp_path / "k"), lateness="150ms",
                                               repartitions=repartitions)
    want, want_dead = run_windows({str(p): f for p, f in parts.items()}, sf.tumbling("100ms"),
                                  run_dir=str(tmp_path / "m"), allowed_lateness="150ms")
    assert late_ids(dead), "the data should hold late records"
    assert late_ids(dead) == late_ids(want_dead)
    assert_same(got, want)
    everything = pl.concat(parts.values())
    on_time = everything.filter(~pl.col("id").is_in(late_ids(dead)))
    assert_same(got, expected(on_time, sf.tumbling("100ms")))
    assert summary.nodes["ticks_tumbling.route"].rows_in == everything.height


def test_an_aggregate_and_a_state_table_behind_a_repartition_topic(kafka_tansu, tmp_path):
    df = ticks(9, 2000, symbols=7).with_row_index("id").with_columns(pl.col("id").cast(pl.Int64))
    topic = kafka_tansu.topic_name("agg")
    produce_partitions(kafka_tansu.bootstrap, topic, {p: df.filter(pl.col("id") % 3 == p) for p in range(3)})
    p = sf.Pipeline("rpagg", run_dir=str(tmp_path))
    src = p.source(kafka.topic(topic, schema={**SCHEMA, "id": pl.Int64}, key="id", group=f"g-{topic}"))
    totals = memory.sink()
    src.aggregate(by="symbol", aggs=[pl.col("volume").sum().alias("volume"), pl.len().alias("n")]).sink(totals)

    @p.stage(src, state=sf.table(key="symbol", schema={"symbol": pl.String, "seen": pl.Int64}))
    def seen(frame: pl.DataFrame, state) -> pl.DataFrame:
        counts = frame.group_by("symbol").agg(pl.len().alias("new"))
        before = state.get(counts.select("symbol"))
        now = counts.join(before, on="symbol", how="left").select(
            "symbol", (pl.col("seen").fill_null(0) + pl.col("new")).alias("seen"))
        state.put(now)
        return now

    running = memory.sink(name="seen")
    seen.sink(running)
    p.run(until_idle=True, handle_signals=False, settings=kafka_tansu.run_settings())
    want = df.group_by("symbol").agg(pl.col("volume").sum().alias("volume"), pl.len().alias("n"))
    last = totals.frame().group_by("symbol").agg(pl.col("volume").max(), pl.col("n").max())
    assert last.sort("symbol").equals(want.sort("symbol").with_columns(pl.col("n").cast(last["n"].dtype)))
    seen_last = running.frame().group_by("symbol").agg(pl.col("seen").max()).sort("symbol")
    assert seen_last["seen"].to_list() == want.sort("symbol")["n"].to_list()


def test_a_repartitioned_stage_must_have_its_columns(kafka_tansu, tmp_path):
    topic = kafka_tansu.topic_name("cols")
    produce_partitions(kafka_tansu.bootstrap, topic, {0: pl.DataFrame({"id": [1, 2], "ts": [1, 2]})})
    p = sf.Pipeline("rpcols", run_dir=str(tmp_path))
    src = p.source(kafka.topic(topic, key="id", group=f"g-{topic}"))
    src.aggregate(by="sector", aggs=[pl.len()]).sink(memory.sink())
    with pytest.raises(sf.StageError, match=r"needs column\(s\) \['sector'\]"):
        p.run(until_idle=True, handle_signals=False, settings=kafka_tansu.run_settings())


def _job(tmp: str, topic: str, settings: str, name: str, **env: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "tests.stateful.kafka_job", topic, f"g-{topic}", os.path.join(tmp, "out"),
           os.path.join(tmp, "checkpoints"), os.path.join(tmp, f"run-{name}"), settings]
    with open(os.path.join(tmp, "job.log"), "ab") as log:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "JOB_KEY": "ts", "JOB_LOG": "INFO", **env})


def _produce_spread(server, n: int) -> tuple[str, pl.DataFrame]:
    """Ticks over 4 partitions by row, so every symbol is in every partition."""
    df = ticks_frame(n, seed=23)
    topic = server.topic_name("spread")
    produce_partitions(server.bootstrap, topic, {p: df.gather_every(4, offset=p) for p in range(4)})
    return topic, df


@pytest.mark.integration
def test_kill_9_mid_stream_with_a_repartition_topic(kafka_tansu, tmp_path):
    tmp = str(tmp_path)
    topic, df = _produce_spread(kafka_tansu, 40_000)
    settings = json.dumps(kafka_tansu.run_settings())
    kill_and_restart(lambda: _job(tmp, topic, settings, "a"), tmp, kills=3, timeout_s=180)
    check(pl.read_parquet(os.path.join(tmp, "out", "*.parquet")), direct(df))


def test_rows_sent_before_a_failed_checkpoint_are_counted_once(kafka_tansu, tmp_path):
    """A source lane's rows reach the topic, then the lane fails before its checkpoint: the restart
    sends them again (new session, from the last checkpoint); readers count them once."""
    tmp = str(tmp_path)
    topic, df = _produce_spread(kafka_tansu, 20_000)
    settings = json.dumps(kafka_tansu.run_settings())
    failing = _job(tmp, topic, settings, "a", JOB_FAIL_AT="4")
    assert failing.wait(timeout=120) == 1
    with open(os.path.join(tmp, "job.log"), errors="replace") as f:
        assert "failing after the sinks flushed, before the checkpoint" in f.read()
    assert _job(tmp, topic, settings, "b").wait(timeout=120) == 0
    got = pl.read_parquet(os.path.join(tmp, "out", "*.parquet"))
    assert got.height == direct(df).height
    check(got, direct(df))


@pytest.mark.integration
def test_two_processes_of_one_group_re_key_through_the_topic(kafka_tansu, tmp_path):
    """Each worker reads some source partitions and some repartition partitions; both end together."""
    tmp = str(tmp_path)
    topic, df = _produce_spread(kafka_tansu, 30_000)
    settings = json.dumps(kafka_tansu.run_settings())
    workers = [_job(tmp, topic, settings, name) for name in ("a", "b")]
    try:
        codes = [w.wait(timeout=180) for w in workers]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait()
    with open(os.path.join(tmp, "job.log"), errors="replace") as f:
        log = f.read()
    assert codes == [0, 0], log[-3000:]
    got = pl.read_parquet(os.path.join(tmp, "out", "*.parquet"))
    assert got.height == direct(df).height  # nothing emitted twice: each key's windows in one process
    check(got, direct(df))
    assert log.count("stage re-keyed through a repartition topic") == 2


def test_a_consumer_group_source_that_is_not_kafka_is_refused_with_what_to_do(tmp_path):
    source = memory.source({"0": ticks(1, 20), "1": ticks(2, 20)})
    source.group_assigned, source.partitioned_by = True, ("price",)  # as a group-assigned source keyed by price
    p = sf.Pipeline("w", run_dir=str(tmp_path / uuid.uuid4().hex), threads=2)
    p.source(source).window(sf.tumbling("100ms"), by="symbol", on="ts", aggs=AGGS).sink(memory.sink())
    with pytest.raises(sf.ConfigError, match="goes through a Kafka repartition topic"):
        p.run(until_idle=True, handle_signals=False)
