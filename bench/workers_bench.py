"""`streamfn run --workers N` scaling on the Kafka reference workload (shared/bench/README.md: ticks,
per-symbol tumbling 1 s count / volume / vwap) with a CPU-bound Python stage, for N = 1, 2, 4 on a
4-partition topic. Prints one JSON line per worker count, and checks every output against the answer.

    python bench/workers_bench.py [--records 400000] [--cpu-loops 8] [--workers 1,2,4]

The clock runs from starting `streamfn run` to its exit: process start, the group join and
rebalances are included, as a user would see them. A local Tansu broker is started and stopped.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import polars as pl
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from streamfn.connectors.kafka.broker import Broker

JOB = Path(__file__).with_name("workers_job.py")
BASE_TS, SYMBOLS = 1_700_000_000_000, 500


def generate(n: int, seed: int = 7) -> pl.DataFrame:
    """The reference ticks (500 symbols, ts +1 ms per 100 records, ~5% zero volume)."""
    rng = np.random.default_rng(seed)
    sym = rng.integers(0, SYMBOLS, n)
    return pl.DataFrame({
        "symbol": pl.Series(sym).cast(pl.String).str.zfill(3),
        "ts": BASE_TS + np.arange(n, dtype=np.int64) // 100,
        "price": np.round(rng.uniform(10.0, 1000.0, n), 4),
        "volume": np.where(rng.random(n) < 0.05, 0, rng.integers(1, 20000, n)),
    }).with_columns(("SYM" + pl.col("symbol")).alias("symbol"))


def answer(ticks: pl.DataFrame) -> pl.DataFrame:
    """The expected windows."""
    return (ticks.filter(pl.col("volume") > 0)
                 .group_by("symbol", (pl.col("ts") // 1000 * 1000).alias("window_start"))
                 .agg(pl.len().cast(pl.Int64).alias("count"), pl.col("volume").sum(),
                      ((pl.col("price") * pl.col("volume")).sum() / pl.col("volume").sum()).alias("vwap")))


def produce(brokers: str, topic: str, ticks: pl.DataFrame) -> None:
    """One JSON message per tick, keyed by symbol, into a 4-partition topic."""
    admin = AdminClient({"bootstrap.servers": brokers})
    admin.create_topics([NewTopic(topic, num_partitions=4, replication_factor=1)])[topic].result(30)
    producer = Producer({"bootstrap.servers": brokers, "linger.ms": 20, "batch.num.messages": 10000,
                         "queue.buffering.max.messages": 1_000_000})
    lines = ticks.write_ndjson().splitlines()
    for i, (line, key) in enumerate(zip(lines, ticks["symbol"].to_list())):
        producer.produce(topic, line.encode(), key)
        if i % 10000 == 0:
            producer.poll(0)
    assert producer.flush(60) == 0


def run(brokers: str, topic: str, workers: int, work: Path, cpu_loops: int) -> tuple[float, pl.DataFrame]:
    """Seconds for `streamfn run [--workers N] --until-idle`, and the windows it wrote."""
    out, group = work / f"out-{workers}", f"bench-{uuid.uuid4().hex[:8]}"
    cmd = [sys.executable, "-m", "streamfn.cli", "run", str(JOB), "--until-idle", "--brokers", brokers,
           "--group", group, "--quiet", "--log-format", "json", "--set", "kafka.session.timeout.ms=1000",
           "--set", "kafka.heartbeat.interval.ms=200"]
    if workers > 1:
        cmd += ["--workers", str(workers)]
    env = {**os.environ, "TOPIC": topic, "OUT_DIR": str(out), "RUN_DIR": str(work / f"run-{workers}"),
           "CPU_LOOPS": str(cpu_loops)}
    started = time.perf_counter()
    with open(work / f"log-{workers}.txt", "wb") as log:
        done = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=600)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"workers={workers} failed (exit {done.returncode}); see {work}/log-{workers}.txt")
    files = sorted(out.glob("**/*.parquet"))
    return seconds, pl.concat([pl.read_parquet(f) for f in files]) if files else pl.DataFrame()


def same(got: pl.DataFrame, expected: pl.DataFrame) -> bool:
    """Equal windows (vwap to 1e-9 relative)."""
    if got.is_empty():
        return False
    key = ["symbol", "window_start"]
    joined = expected.join(got.select(key + ["count", "volume", "vwap"]), on=key, how="full", suffix="_got")
    return bool(joined.height == expected.height == got.height and joined.select(
        (pl.col("count") == pl.col("count_got")).all() & (pl.col("volume") == pl.col("volume_got")).all()
        & ((pl.col("vwap") - pl.col("vwap_got")).abs() <= 1e-9 * pl.col("vwap").abs()).all()).item())


def main() -> None:
    """Print one JSON line per worker count."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=400_000)
    ap.add_argument("--cpu-loops", type=int, default=8)
    ap.add_argument("--workers", default="1,2,4")
    args = ap.parse_args()
    ticks = generate(args.records)
    expected = answer(ticks)
    with tempfile.TemporaryDirectory(prefix="workers-bench-") as tmp:
        broker = Broker(log_path=os.path.join(tmp, "tansu.log"))
        try:
            topic = f"ticks-{uuid.uuid4().hex[:8]}"
            produce(broker.bootstrap, topic, ticks)
            for workers in [int(w) for w in args.workers.split(",")]:
                seconds, got = run(broker.bootstrap, topic, workers, Path(tmp), args.cpu_loops)
                print(json.dumps({"workers": workers, "records": args.records, "seconds": round(seconds, 2),
                                  "rec_per_s": round(args.records / seconds), "cpus": os.cpu_count(),
                                  "correct": same(got, expected)}), flush=True)
        finally:
            broker.stop()


if __name__ == "__main__":
    main()
