"""Kafka source and sink against real brokers (Tansu and noida-db) started by tests/servers/kafka.py."""
from __future__ import annotations

import glob
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import polars as pl
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

import streamfn as sf
from streamfn.connectors import kafka, memory
from streamfn.connectors.kafka.topics import BrokerUnavailable, TopicMissing
from tests.servers.kafka import KafkaServer

pytestmark = pytest.mark.integration

SCHEMA = {"id": pl.Int64, "symbol": pl.String, "price": pl.Float64}


def create_topic(server: KafkaServer, topic: str, partitions: int = 4) -> None:
    admin = AdminClient({"bootstrap.servers": server.bootstrap})
    admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])[topic].result(30)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        meta = admin.list_topics(timeout=10).topics.get(topic)
        if meta is not None and len(meta.partitions) == partitions:
            return
        time.sleep(0.1)
    raise AssertionError(f"topic {topic} did not appear")


def produce(server: KafkaServer, topic: str, values: list[bytes], keys: list[str] | None = None) -> list[tuple[int, int]]:
    """Produce values; return each one's (partition, offset)."""
    where: dict[int, tuple[int, int]] = {}
    producer = Producer({"bootstrap.servers": server.bootstrap, "linger.ms": 5})
    for i, value in enumerate(values):
        def done(err, msg, i=i):
            assert err is None, err
            where[i] = (msg.partition(), msg.offset())
        producer.produce(topic, value, keys[i] if keys else str(i), on_delivery=done)
        if i % 1000 == 0:
            producer.poll(0)
    assert producer.flush(30) == 0
    return [where[i] for i in range(len(values))]


def ticks(n: int, start: int = 0) -> pl.DataFrame:
    ids = pl.int_range(start, start + n, eager=True)
    return pl.DataFrame({"id": ids, "symbol": ("SYM" + (ids % 17).cast(pl.String)),
                         "price": ids.cast(pl.Float64) / 8})


def read_topic(server: KafkaServer, topic: str | list[str], run_dir: str,
               **kw) -> tuple[pl.DataFrame, sf.RunSummary]:
    p = sf.Pipeline("read", run_dir=run_dir)
    out = memory.sink()
    p.source(kafka.topic(topic, group=server.topic_name("g"), **kw)).sink(out)
    summary = p.run(until_idle=True, settings=server.run_settings())
    return out.frame(), summary


def dead_letters(run_dir: str) -> pl.DataFrame:
    paths = glob.glob(os.path.join(run_dir, "dead_letters", "*.jsonl"))
    return pl.concat([pl.read_ndjson(p) for p in paths]) if paths else pl.DataFrame()


# -- round trips, on both brokers ----------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["json", "csv", "arrow", "raw"])
def test_round_trip_every_format(kafka_server: KafkaServer, fmt: str, tmp_path: Path) -> None:
    topic = kafka_server.topic_name(fmt)
    data = ticks(3000)
    if fmt == "raw":
        data = data.select(pl.col("id"), pl.format("{}|{}", "id", "symbol").cast(pl.Binary).alias("value"))
    writer = sf.Pipeline("write", run_dir=str(tmp_path / "w"))
    writer.source(memory.source(data, batch_rows=700)).sink(
        kafka.topic(topic, format=fmt, key="id", create=True, partitions=4))
    writer.run(until_idle=True, settings=kafka_server.run_settings())

    schema = None if fmt in ("arrow", "raw") else SCHEMA
    got, summary = read_topic(kafka_server, topic, str(tmp_path / "r"), format=fmt, schema=schema)
    assert summary.dead_letters == 0
    if fmt == "raw":
        expected = data.select("value").sort("value")
        assert got.select("value").sort("value").equals(expected)
    else:
        assert got.select(list(SCHEMA)).sort("id").equals(data.sort("id"))
    assert summary.lanes >= 1


def test_malformed_json_goes_to_dead_letters_with_partition_and_offset(kafka_server: KafkaServer,
                                                                       tmp_path: Path) -> None:
    topic = kafka_server.topic_name("bad")
    create_topic(kafka_server, topic, 4)
    values = [json.dumps({"id": i, "symbol": "S", "price": 1.0}).encode() if i % 20 else b'{"id": 1, "sym'
              for i in range(4000)]
    values[7] = b"[1, 2]"  # valid JSON, but not an object
    where = produce(kafka_server, topic, values)
    run_dir = str(tmp_path / "run")
    got, summary = read_topic(kafka_server, topic, run_dir, schema=SCHEMA)
    bad = {i for i in range(4000) if i % 20 == 0} | {7}
    assert sorted(got["id"].to_list()) == [i for i in range(4000) if i not in bad]
    assert summary.dead_letters == len(bad)
    letters = dead_letters(run_dir)
    assert letters.height == len(bad)
    found = {(int(p), int(o)) for p, o in letters.select("partition", "offset").iter_rows()}
    assert found == {where[i] for i in bad}
    assert set(letters["stage"]) == {"parse"}
    assert letters.filter(pl.col("payload") == "[1, 2]")["error"].item().startswith("expected a JSON object")


def test_committed_offsets_resume_after_restart(kafka_server: KafkaServer, tmp_path: Path) -> None:
    topic, group = kafka_server.topic_name("resume"), kafka_server.topic_name("group")
    create_topic(kafka_server, topic, 4)
    produce(kafka_server, topic, [json.dumps({"id": i}).encode() for i in range(1000)])

    def run_once(name: str) -> pl.DataFrame:
        p = sf.Pipeline(name, run_dir=str(tmp_path / name))
        out = memory.sink()
        p.source(kafka.topic(topic, group=group, schema={"id": pl.Int64})).sink(out)
        p.run(until_idle=True, settings=kafka_server.run_settings())
        return out.frame()

    assert sorted(run_once("first")["id"].to_list()) == list(range(1000))
    produce(kafka_server, topic, [json.dumps({"id": i}).encode() for i in range(1000, 1500)])
    assert sorted(run_once("second")["id"].to_list()) == list(range(1000, 1500))
    consumer = Consumer({"bootstrap.servers": kafka_server.bootstrap, "group.id": group})
    try:
        committed = consumer.committed([TopicPartition(topic, p) for p in range(4)], timeout=10)
    finally:
        consumer.close()
    assert sum(tp.offset for tp in committed) == 1500


def test_transactional_sink_commits_output_and_offsets(kafka_server: KafkaServer, tmp_path: Path) -> None:
    source_topic, out_topic = kafka_server.topic_name("tx-in"), kafka_server.topic_name("tx-out")
    group = kafka_server.topic_name("txg")
    create_topic(kafka_server, source_topic, 2)
    produce(kafka_server, source_topic, [json.dumps({"id": i}).encode() for i in range(600)])
    p = sf.Pipeline("tx", run_dir=str(tmp_path / "tx"), checkpoint_interval="0.2s")
    src = p.source(kafka.topic(source_topic, group=group, schema={"id": pl.Int64}))
    src.stage(lambda df: df.with_columns(double=pl.col("id") * 2), name="double").sink(
        kafka.topic(out_topic, format="json", key="id", transactional=True, create=True, partitions=2))
    p.run(until_idle=True, settings=kafka_server.run_settings())
    got, _ = read_topic(kafka_server, out_topic, str(tmp_path / "r"), schema={"id": pl.Int64, "double": pl.Int64})
    assert sorted(got["id"].to_list()) == list(range(600))
    assert (got["double"] == got["id"] * 2).all()
    consumer = Consumer({"bootstrap.servers": kafka_server.bootstrap, "group.id": group})
    try:
        committed = consumer.committed([TopicPartition(source_topic, p) for p in range(2)], timeout=10)
    finally:
        consumer.close()
    assert sum(tp.offset for tp in committed) == 600


# -- Tansu only (the embedded broker's behaviour) ----------------------------------------------------
def test_metadata_columns_on_request(kafka_tansu: KafkaServer, tmp_path: Path) -> None:
    topic = kafka_tansu.topic_name("meta")
    create_topic(kafka_tansu, topic, 2)
    producer = Producer({"bootstrap.servers": kafka_tansu.bootstrap})
    for i in range(20):
        producer.produce(topic, json.dumps({"id": i}).encode(), key=f"k{i}", timestamp=1_700_000_000_000 + i,
                         headers=[("h", f"v{i}".encode())])
    producer.flush(10)
    got, _ = read_topic(kafka_tansu, topic, str(tmp_path / "r"), schema={"id": pl.Int64},
                        include=["key", "partition", "offset", "timestamp", "headers"])
    got = got.sort("id")
    assert got["kafka_key"].to_list() == [f"k{i}".encode() for i in range(20)]
    assert got["kafka_partition"].is_in([0, 1]).all()
    assert got.group_by("kafka_partition").agg(pl.col("kafka_offset").sort().diff().drop_nulls().eq(1).all()) \
        ["kafka_offset"].all()
    assert got["kafka_timestamp"].dt.epoch("ms").to_list() == [1_700_000_000_000 + i for i in range(20)]
    assert got["kafka_headers"][3].to_list() == [{"key": "h", "value": b"v3"}]


def test_failed_delivery_is_dead_lettered_with_the_reason(kafka_tansu: KafkaServer, tmp_path: Path) -> None:
    topic = kafka_tansu.topic_name("big")
    data = pl.DataFrame({"id": [1, 2, 3], "blob": ["x", "y" * 5000, "z"]})
    run_dir = str(tmp_path / "run")
    p = sf.Pipeline("big", run_dir=run_dir)
    p.source(memory.source(data)).sink(kafka.topic(topic, create=True, message_max_bytes=2000))
    summary = p.run(until_idle=True, settings=kafka_tansu.run_settings())
    assert summary.dead_letters == 1
    letter = dead_letters(run_dir).row(0, named=True)
    assert "Kafka refused the message" in letter["error"] and letter["stage"] == f"sink {topic}"
    got, _ = read_topic(kafka_tansu, topic, str(tmp_path / "r"), schema={"id": pl.Int64, "blob": pl.String})
    assert sorted(got["id"].to_list()) == [1, 3]


def test_missing_broker_is_a_clear_error_after_a_bounded_wait(tmp_path: Path) -> None:
    from streamfn.connectors.kafka.broker import free_port

    p = sf.Pipeline("nobroker", run_dir=str(tmp_path))
    p.source(kafka.topic("ticks", brokers=f"127.0.0.1:{free_port()}", timeout="2s")).sink(memory.sink())
    with pytest.raises(BrokerUnavailable, match="no Kafka broker answered at 127.0.0.1:.* within 2s"):
        p.run(until_idle=True)


def test_missing_topic_is_an_error_unless_created(kafka_tansu: KafkaServer, tmp_path: Path) -> None:
    topic = kafka_tansu.topic_name("missing")
    p = sf.Pipeline("notopic", run_dir=str(tmp_path / "a"))
    p.source(kafka.topic(topic)).sink(memory.sink())
    with pytest.raises(TopicMissing, match=f"Kafka topic '{topic}' does not exist.*create=True"):
        p.run(until_idle=True, settings=kafka_tansu.run_settings())
    admin = AdminClient({"bootstrap.servers": kafka_tansu.bootstrap})
    assert topic not in admin.list_topics(timeout=10).topics  # checking did not create it

    p = sf.Pipeline("createtopic", run_dir=str(tmp_path / "b"))
    p.source(kafka.topic(topic, create=True, partitions=3)).sink(memory.sink())
    summary = p.run(until_idle=True, settings=kafka_tansu.run_settings())
    assert summary.lanes == 3
    assert len(admin.list_topics(timeout=10).topics[topic].partitions) == 3


def test_embedded_broker_when_no_brokers_are_configured(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from streamfn.connectors.kafka import broker

    p = sf.Pipeline("embedded", run_dir=str(tmp_path))
    p.source(memory.source(ticks(100))).sink(kafka.topic("ticks", format="arrow"))
    with caplog.at_level("INFO", logger="streamfn.kafka"):
        summary = p.run(until_idle=True)
    assert summary.rows_in("ticks") == 100
    assert [r for r in caplog.records if "started an embedded broker" in r.getMessage()]
    assert broker.shared._broker is None  # stopped at the end of the run


def test_broker_cli_serves_until_terminated() -> None:
    from streamfn.connectors.kafka.broker import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "streamfn.connectors.kafka.broker", "--port", str(port)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert f"127.0.0.1:{port}" in proc.stdout.readline()  # type: ignore[union-attr]
        admin = AdminClient({"bootstrap.servers": f"127.0.0.1:{port}"})
        admin.list_topics(timeout=10)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        proc.stdout.close()  # type: ignore[union-attr]


# -- two worker processes in one group ---------------------------------------------------------------
def _outputs(out_dir: Path) -> pl.DataFrame:
    paths = sorted(glob.glob(str(out_dir / "*.jsonl")))
    frames = [pl.read_ndjson(p) for p in paths if os.path.getsize(p)]
    return pl.concat(frames) if frames else pl.DataFrame(schema={"id": pl.Int64, "kafka_partition": pl.Int32})


def _wait_for(check, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_two_workers_split_partitions_and_one_takes_over(kafka_tansu: KafkaServer, tmp_path: Path) -> None:
    topic, group = kafka_tansu.topic_name("split"), kafka_tansu.topic_name("workers")
    create_topic(kafka_tansu, topic, 4)
    root = Path(__file__).resolve().parents[2]
    outs = [tmp_path / "out-a", tmp_path / "out-b"]
    procs = []
    for i, out in enumerate(outs):
        with open(tmp_path / f"worker-{i}.log", "wb") as log:
            procs.append(subprocess.Popen([sys.executable, "-m", "tests.connectors._kafka_worker", kafka_tansu.bootstrap,
                                           topic, group, str(out), str(tmp_path / f"run-{i}")], cwd=root,
                                          stdout=subprocess.DEVNULL, stderr=log))
    try:
        for start in range(0, 2000, 100):  # spread over seconds: both workers are in the group before the end
            produce(kafka_tansu, topic, [json.dumps({"id": i}).encode() for i in range(start, start + 100)])
            time.sleep(0.25)

        def both_done() -> bool:
            return {*_outputs(outs[0])["id"], *_outputs(outs[1])["id"]} >= set(range(2000))

        _wait_for(both_done, 60, "both workers to read the first 2000 records")
        # the group split the work (a worker that joined late took partitions over from the other)
        first = [set(_outputs(out)["id"]) for out in outs]
        assert first[0] and first[1], f"the group did not split: {[len(ids) for ids in first]} records"
        procs[1].kill()  # a hard stop: no revoke, no last commit
        procs[1].wait(10)
        produce(kafka_tansu, topic, [json.dumps({"id": i}).encode() for i in range(2000, 3000)])
        _wait_for(lambda: set(_outputs(outs[0])["id"]) >= set(range(2000, 3000)), 60,
                  "the surviving worker to take over every partition")
        assert set(_outputs(outs[0])["kafka_partition"]) == {0, 1, 2, 3}
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        assert procs[0].wait(30) == 0
    seen = {*_outputs(outs[0])["id"], *_outputs(outs[1])["id"]}
    assert seen == set(range(3000))  # every record processed at least once, none lost


def test_stage_failures_are_dead_lettered_with_their_kafka_offsets(kafka_tansu: KafkaServer, tmp_path: Path) -> None:
    topic = kafka_tansu.topic_name("stagefail")
    create_topic(kafka_tansu, topic, 2)
    where = produce(kafka_tansu, topic, [json.dumps({"id": i}).encode() for i in range(300)])
    run_dir = str(tmp_path / "run")
    p = sf.Pipeline("stagefail", run_dir=run_dir)
    src = p.source(kafka.topic(topic, group=kafka_tansu.topic_name("g"), schema={"id": pl.Int64}))

    def picky(df: pl.DataFrame) -> pl.DataFrame:
        if (df["id"] % 50 == 7).any():
            raise ValueError("no sevens")
        return df

    out = memory.sink()
    src.stage(picky, name="picky").sink(out)
    summary = p.run(until_idle=True, settings=kafka_tansu.run_settings())
    bad = [i for i in range(300) if i % 50 == 7]
    assert sorted(out.frame()["id"].to_list()) == [i for i in range(300) if i not in bad]
    assert summary.dead_letters == len(bad)
    letters = dead_letters(run_dir)
    assert {(int(p), int(o)) for p, o in letters.select("partition", "offset").iter_rows()} == {where[i] for i in bad}


# -- settings (no broker needed) ---------------------------------------------------------------------
def test_client_settings_layering() -> None:
    from streamfn.connectors.kafka.config import client_config

    settings = {"kafka.brokers": "b:1", "kafka.group": "g", "kafka.fetch.wait.max.ms": "5", "kafka.linger.ms": "7",
                "kafka.consumer.session.timeout.ms": "7000", "kafka.producer.acks": "1", "other": "x"}
    consumer = client_config("consumer", brokers="b:1", embedded=False, settings=settings,
                             given={"fetch.wait.max.ms": 9})
    assert consumer["fetch.wait.max.ms"] == 9  # the connector's argument wins over --set
    assert consumer["session.timeout.ms"] == "7000" and consumer["bootstrap.servers"] == "b:1"
    assert "linger.ms" not in consumer and "acks" not in consumer and "brokers" not in consumer
    assert consumer["fetch.queue.backoff.ms"] == 10 and consumer["enable.auto.commit"] is False
    producer = client_config("producer", brokers="b:1", embedded=True, settings=settings, given={})
    assert producer["linger.ms"] == "7" and producer["acks"] == "1" and producer["enable.idempotence"] is True
    assert "fetch.wait.max.ms" not in producer and "session.timeout.ms" not in producer
    embedded = client_config("consumer", brokers="b:1", embedded=True, settings={}, given={})
    assert embedded["session.timeout.ms"] == 1000


def test_bad_options_are_config_errors() -> None:
    from streamfn.errors import ConfigError

    with pytest.raises(ConfigError, match="format"):
        kafka.topic("t", format="xml")
    with pytest.raises(ConfigError, match="start"):
        kafka.topic("t", start="middle")
    with pytest.raises(ConfigError, match="include"):
        kafka.topic("t", include=["colour"])


def test_dead_letters_can_go_to_a_kafka_topic(kafka_tansu: KafkaServer, tmp_path: Path) -> None:
    topic, dlq = kafka_tansu.topic_name("in"), kafka_tansu.topic_name("dlq")
    create_topic(kafka_tansu, topic, 2)
    produce(kafka_tansu, topic, [b'{"id": 1}', b"oops", b'{"id": 2}'])
    p = sf.Pipeline("dlq", run_dir=str(tmp_path / "run"))
    p.dead_letter(kafka.topic(dlq, create=True))
    out = memory.sink()
    p.source(kafka.topic(topic, group=kafka_tansu.topic_name("g"), schema={"id": pl.Int64})).sink(out)
    p.run(until_idle=True, settings=kafka_tansu.run_settings())
    assert sorted(out.frame()["id"].to_list()) == [1, 2]
    letters, _ = read_topic(kafka_tansu, dlq, str(tmp_path / "r"))
    assert letters["payload"].to_list() == ["oops"] and letters["error"][0].startswith("malformed JSON")


def test_small_read_ahead_pauses_and_resumes_partitions(kafka_tansu: KafkaServer, tmp_path: Path) -> None:
    topic = kafka_tansu.topic_name("pause")
    create_topic(kafka_tansu, topic, 2)
    produce(kafka_tansu, topic, [json.dumps({"id": i}).encode() for i in range(5000)])
    got, summary = read_topic(kafka_tansu, topic, str(tmp_path / "r"), schema={"id": pl.Int64},
                              queue_messages=40, consume_batch=25)
    assert sorted(got["id"].to_list()) == list(range(5000))
    assert summary.dead_letters == 0


def test_one_source_reads_several_topics(kafka_tansu: KafkaServer, tmp_path: Path) -> None:
    first, second = kafka_tansu.topic_name("a"), kafka_tansu.topic_name("b")
    for topic, ids in ((first, range(0, 100)), (second, range(100, 250))):
        create_topic(kafka_tansu, topic, 2)
        produce(kafka_tansu, topic, [json.dumps({"id": i}).encode() for i in ids])
    got, summary = read_topic(kafka_tansu, [first, second], str(tmp_path / "r"), schema={"id": pl.Int64})
    assert sorted(got["id"].to_list()) == list(range(250))
    assert summary.lanes == 4



def test_a_partition_paused_at_a_rebalance_is_read_after_it(kafka_tansu: KafkaServer, tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    """librdkafka keeps a partition's pause across unassign/assign: a partition paused (full
    read-ahead) when a rebalance revokes it must be read again once it is assigned back."""
    caplog.set_level(logging.INFO, logger="streamfn.kafka")

    def revoked() -> bool:
        return any(r.getMessage() == "kafka partitions revoked" for r in caplog.records)

    topic, group = kafka_tansu.topic_name("repause"), kafka_tansu.topic_name("g")
    create_topic(kafka_tansu, topic, 2)
    produce(kafka_tansu, topic, [json.dumps({"id": i}).encode() for i in range(3000)])
    p = sf.Pipeline("repause", run_dir=str(tmp_path / "run"), batch_rows=10)
    src = p.source(kafka.topic(topic, group=group, schema={"id": pl.Int64}, queue_messages=20, consume_batch=10))

    @p.stage(src)
    def slow(df: pl.DataFrame) -> pl.DataFrame:
        time.sleep(0.02)  # keeps the read-ahead full: both partitions are paused most of the time
        return df

    out = memory.sink()
    slow.sink(out)
    done = threading.Event()
    thread = threading.Thread(target=lambda: (p.run(until_idle=True, settings=kafka_tansu.run_settings(),
                                                    handle_signals=False), done.set()), daemon=True)
    thread.start()
    _wait_for(lambda: out.frame().height > 0, 30, "the first rows")
    other = kafka_tansu.topic_name("other")  # the joiner reads another topic: the run keeps both partitions
    create_topic(kafka_tansu, other, 1)
    joiner = Consumer({"bootstrap.servers": kafka_tansu.bootstrap, "group.id": group, "enable.auto.commit": False,
                       "session.timeout.ms": 1000, "heartbeat.interval.ms": 200})
    joined = threading.Event()
    joiner.subscribe([other], on_assign=lambda consumer, partitions: joined.set())
    deadline = time.monotonic() + 60
    # a rebalance: the run's partitions are revoked (Tansu may keep rebalancing while the run's
    # consumer rejoins, so now and then the joiner's own assignment does not come within the wait)
    while not joined.is_set() and time.monotonic() < deadline:
        joiner.poll(0.1)
    joiner.close()  # and another; both times they come back, paused in librdkafka when revoked
    assert joined.is_set() or revoked(), "the second consumer never made the group rebalance"
    assert done.wait(60), "the run never read the partitions that came back after the rebalance"
    assert set(out.frame()["id"]) == set(range(3000))
