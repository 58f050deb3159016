"""kill -9 a process reading Kafka through a window stage, restart it: every window exactly right."""
from __future__ import annotations

import json
import os
import subprocess
import signal
import sys
import time

import polars as pl
import pytest

from tests.stateful.test_crash import ROOT, check, direct, kill_and_restart, published, write_ticks


def produce(bootstrap: str, topic: str, rows: list[dict]) -> None:
    """Write rows keyed by symbol (so each symbol's state lives in one partition)."""
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, num_partitions=4, replication_factor=1,
                                  config={"retention.ms": "-1", "retention.bytes": "-1"})])[topic].result(10)
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20})
    for row in rows:
        producer.produce(topic, json.dumps(row).encode(), key=row["symbol"].encode())
        producer.poll(0)
    assert producer.flush(30) == 0


@pytest.mark.integration
def test_kill_9_mid_stream_from_kafka(tmp_path, kafka_tansu):
    tmp = str(tmp_path)
    df = write_ticks(os.path.join(tmp, "unused"), n=60_000)
    topic = kafka_tansu.topic_name("ticks")
    produce(kafka_tansu.bootstrap, topic, df.to_dicts())
    settings = json.dumps(kafka_tansu.run_settings())
    cmd = [sys.executable, "-m", "tests.stateful.kafka_job", topic, f"g-{topic}", os.path.join(tmp, "out"),
           os.path.join(tmp, "checkpoints"), os.path.join(tmp, "run"), settings]

    def start() -> subprocess.Popen:
        with open(os.path.join(tmp, "job.log"), "ab") as log:
            return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)

    kill_and_restart(start, tmp, kills=3, timeout_s=180)
    check(pl.read_parquet(os.path.join(tmp, "out", "*.parquet")), direct(df))


@pytest.mark.integration
def test_a_second_process_takes_over_partitions_with_their_state(tmp_path, kafka_tansu):
    """Two workers in one group share a checkpoint URL; one is killed, the other carries on."""
    tmp = str(tmp_path)
    df = write_ticks(os.path.join(tmp, "unused"), n=60_000)
    topic = kafka_tansu.topic_name("ticks")
    produce(kafka_tansu.bootstrap, topic, df.to_dicts())
    settings = json.dumps(kafka_tansu.run_settings())
    last_window = df["ts"].max() // 1000 * 1000  # never closes without an end of input
    want = direct(df).filter(pl.col("window_start") < last_window)

    def start(name: str, follow: bool = True) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "tests.stateful.kafka_job", topic, f"g-{topic}", os.path.join(tmp, "out"),
               os.path.join(tmp, "checkpoints"), os.path.join(tmp, f"run-{name}"), settings,
               *(["follow"] if follow else [])]
        with open(os.path.join(tmp, f"{name}.log"), "ab") as log:
            return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                    env={**os.environ, "JOB_LOG": "INFO"})

    def windows_out() -> int:
        if not published(tmp):
            return 0
        got = pl.read_parquet(os.path.join(tmp, "out", "*.parquet"))
        return got.select("symbol", "window_start").unique().height

    first, second = start("a"), start("b")
    third = None
    try:
        deadline = time.monotonic() + 60
        while windows_out() < 20 and time.monotonic() < deadline:  # both hold partitions, mid-stream
            time.sleep(0.02)
        os.kill(second.pid, signal.SIGKILL)
        assert second.wait() == -signal.SIGKILL
        deadline = time.monotonic() + 120
        while windows_out() < want.height and time.monotonic() < deadline:
            time.sleep(0.1)
        os.kill(first.pid, signal.SIGTERM)
        assert first.wait(timeout=60) == 0
        check(pl.read_parquet(os.path.join(tmp, "out", "*.parquet")), want)
        # a later run of the group restores every partition and closes the last windows at the end
        third = start("c", follow=False)
        assert third.wait(timeout=120) == 0
    finally:
        for proc in (first, second, third):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    with open(os.path.join(tmp, "b.log"), errors="replace") as f:
        assert "lane opened" in f.read()  # the second worker did hold partitions before it died
    check(pl.read_parquet(os.path.join(tmp, "out", "*.parquet")), direct(df))


@pytest.mark.integration
def test_a_failure_between_checkpoint_and_transaction_loses_no_window(tmp_path, kafka_noida):
    """The lane's checkpoint is saved, then the run fails before the Kafka transaction holding that
    checkpoint's windows commits: the restart restores the checkpoint at the committed offset (not
    the newer one), so those windows are emitted again, in a transaction that commits.
    On noida-db: Tansu does not hide aborted transactions from read_committed consumers."""
    from tests.connectors.test_kafka import read_topic

    tmp = str(tmp_path)
    df = write_ticks(os.path.join(tmp, "unused"), n=20_000)
    topic, out_topic = kafka_noida.topic_name("ticks"), kafka_noida.topic_name("windows")
    produce(kafka_noida.bootstrap, topic, df.to_dicts())
    settings = json.dumps(kafka_noida.run_settings())

    def job(*fail: str) -> int:
        cmd = [sys.executable, "-m", "tests.stateful.txn_job", topic, out_topic, f"g-{topic}",
               os.path.join(tmp, "checkpoints"), os.path.join(tmp, "run"), settings, *fail]
        with open(os.path.join(tmp, "job.log"), "ab") as log:
            return subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=180,
                                  env={**os.environ, "JOB_LOG": "INFO"}).returncode

    assert job("1") == 1  # failed in the commit of its first windows
    assert job() == 0
    with open(os.path.join(tmp, "job.log"), errors="replace") as f:
        assert "checkpoint is past the committed offset" in f.read()
    got, _ = read_topic(kafka_noida, out_topic, os.path.join(tmp, "read"),
                        schema={"symbol": pl.String, "window_start": pl.Int64, "count": pl.Int64,
                                "volume": pl.Int64, "vwap": pl.Float64})
    want = direct(df)
    assert got.height == want.height  # none twice
    check(got, want)  # none lost, every value right
