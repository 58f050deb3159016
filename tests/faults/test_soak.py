"""Soak: a steady stream through two supervised workers, one killed now and then (a rebalance each
time), for STREAMFN_SOAK_S seconds (default 30 in CI; e.g. STREAMFN_SOAK_S=600 for a long run).

Checked: the long-lived worker's memory stays flat (RSS sampled each second: the median of the last
quarter is within 1.3x + 40 MiB of the second quarter's), the group's lag stays under 30 s of input
and drains to zero once the producer stops, and every window of every record produced is exact.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import threading
import time

import numpy as np
import polars as pl
import pytest

from tests.faults.harness import FaultReport, SupervisedJob, account, schedule
from tests.stateful.test_crash import direct

pytestmark = pytest.mark.integration

SOAK_S = float(os.environ.get("STREAMFN_SOAK_S", "30"))
RATE = 2000  # records a second
SYMBOLS = [f"SYM{i:02d}" for i in range(20)]


def rss_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class SteadyProducer(threading.Thread):
    """RATE records a second, event time = wall-clock time, keyed by symbol."""

    def __init__(self, bootstrap: str, topic: str, seed: int) -> None:
        super().__init__(name="soak-producer", daemon=True)
        from confluent_kafka import Producer

        self.producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20})
        self.topic, self.rng = topic, np.random.default_rng(seed)
        self.rows: list[dict] = []
        self.stop_at = time.monotonic() + SOAK_S

    def run(self) -> None:
        while time.monotonic() < self.stop_at:
            now_ms = int(time.time() * 1000)
            for _ in range(RATE // 20):
                self.send({"symbol": SYMBOLS[int(self.rng.integers(0, 20))], "ts": now_ms,
                           "price": round(float(self.rng.uniform(10, 1000)), 4),
                           "volume": int(self.rng.integers(0, 20000))})
            self.producer.poll(0)
            time.sleep(0.05)
        end = max(r["ts"] for r in self.rows) + 5_000  # one late tick per symbol closes every window
        for symbol in SYMBOLS:
            self.producer.produce(self.topic, json.dumps({"symbol": symbol, "ts": end, "price": 1.0,
                                                          "volume": 1}).encode(), key=symbol.encode())
        assert self.producer.flush(30) == 0

    def send(self, row: dict) -> None:
        self.rows.append(row)
        self.producer.produce(self.topic, json.dumps(row).encode(), key=row["symbol"].encode())


def lag(bootstrap: str, topic: str, group: str) -> int:
    """Records in the topic not yet committed by the group."""
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        parts = [TopicPartition(topic, p) for p in range(4)]
        committed = {tp.partition: tp.offset for tp in c.committed(parts, timeout=10)}
        total = 0
        for p in range(4):
            _, high = c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            total += high - max(committed.get(p, 0), 0)
        return total
    finally:
        c.close()


def test_soak_steady_rate_with_rebalances(tmp_path, kafka_tansu):
    from confluent_kafka.admin import AdminClient, NewTopic

    tmp, rng, report = str(tmp_path), schedule("soak"), FaultReport(f"soak {SOAK_S:g}s")
    topic = kafka_tansu.topic_name("soak")
    group = f"g-{topic}"
    admin = AdminClient({"bootstrap.servers": kafka_tansu.bootstrap})
    admin.create_topics([NewTopic(topic, num_partitions=4, replication_factor=1)])[topic].result(10)
    argv = [sys.executable, "-m", "tests.stateful.kafka_job", topic, group, os.path.join(tmp, "out"),
            os.path.join(tmp, "checkpoints"), os.path.join(tmp, "run"), json.dumps(kafka_tansu.run_settings()),
            "follow"]
    samples: list[int] = []
    lags: list[int] = []
    producer = SteadyProducer(kafka_tansu.bootstrap, topic, seed=rng.randint(0, 2**31))
    with SupervisedJob(argv, os.path.join(tmp, "job.log"), env={"JOB_LOG": "INFO"}, workers=2,
                       max_failures=1000) as job:
        assert job.wait_running(lanes=1)
        producer.start()
        next_kill = time.monotonic() + rng.uniform(5, 10)
        while producer.is_alive():
            time.sleep(1.0)
            worker = job.worker(0)
            if worker is not None and (rss := rss_bytes(worker.pid)) is not None:
                samples.append(rss)
            lags.append(lag(kafka_tansu.bootstrap, topic, group))
            if time.monotonic() >= next_kill and job.kill_worker(1):
                report.fault("kill -9 worker 1 (rebalance)")
                next_kill = time.monotonic() + rng.uniform(5, 10)
        deadline = time.monotonic() + 120
        while (remaining := lag(kafka_tansu.bootstrap, topic, group)) > 0:
            assert time.monotonic() < deadline, f"lag stuck at {remaining}:\n{job.tail()}"
            time.sleep(0.5)
        job.supervisor.stop("soak finished")
        assert job.wait(60) == 0, job.tail()
        report.worker_restarts = job.restarts
    report.recovered = report.faults_injected
    q = max(1, len(samples) // 4)
    early, late = statistics.median(samples[q:2 * q]), statistics.median(samples[-q:])
    mib = 1 << 20
    print(f"\nSOAK rss MiB early {early / mib:.0f} late {late / mib:.0f} max {max(samples) / mib:.0f}; "
          f"max lag {max(lags)} records; rate {RATE}/s for {SOAK_S:g}s")
    assert late <= early * 1.3 + 40 * mib, f"RSS grew from {early / mib:.0f} to {late / mib:.0f} MiB"
    assert max(lags) <= RATE * 30, f"the group fell {max(lags)} records (over 30 s of input) behind"
    df = pl.DataFrame(producer.rows, schema={"symbol": pl.String, "ts": pl.Int64, "price": pl.Float64,
                                             "volume": pl.Int64})
    want = direct(df)
    got = pl.read_parquet(os.path.join(tmp, "out", "*.parquet")).filter(pl.col("window_start") <= df["ts"].max())
    account(report, got.select(want.columns), want, df)
