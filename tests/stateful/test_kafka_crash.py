"""kill -9 a process reading Kafka through a window stage, restart it: every window exactly right."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.stateful.test_crash import ROOT, check, direct, published, write_ticks


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
    df = write_ticks(os.path.join(tmp, "unused"), n=20_000)
    topic = kafka_tansu.topic_name("ticks")
    produce(kafka_tansu.bootstrap, topic, df.to_dicts())
    settings = json.dumps(kafka_tansu.run_settings())
    cmd = [sys.executable, "-m", "tests.stateful.kafka_job", topic, f"g-{topic}", os.path.join(tmp, "out"),
           os.path.join(tmp, "checkpoints"), os.path.join(tmp, "run"), settings]

    def start() -> subprocess.Popen:
        with open(os.path.join(tmp, "job.log"), "ab") as log:
            return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)

    killed = 0
    for _ in range(3):
        seen = published(tmp)
        proc = start()
        deadline = time.monotonic() + 60
        while published(tmp) <= seen + 1 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        killed += proc.wait() == -signal.SIGKILL
    assert killed == 3
    proc = start()
    assert proc.wait(timeout=180) == 0, open(os.path.join(tmp, "job.log")).read()[-3000:]
    import polars as pl

    check(pl.read_parquet(os.path.join(tmp, "out", "*.parquet")), direct(df))
