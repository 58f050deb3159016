"""`streamfn run --workers N` scaling on the Kafka reference workload (shared/bench/README.md: ticks,
per-symbol tumbling 1 s count / volume / vwap) with a CPU-bound Python stage, for N = 1, 2, 4 on a
4-partition topic. Prints one JSON line per worker count, and checks every output against the answer.

    python bench/workers_bench.py [--records 400000] [--cpu-loops 8] [--workers 1,2,4]

The clock runs from starting `streamfn run` (following the topic, not --until-idle) until every
window of the answer is in the output; process start, the group join and the rebalances as workers
join are included, as a user would see them. An END tick on every partition, 10 s after the last
tick, moves the watermark so that the last real windows close. Then SIGTERM drains the workers.
A local Tansu broker is started and stopped.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
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
BASE_TS, SYMBOLS, END = 1_700_000_000_000, 500, "END"


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
    """One JSON message per tick, keyed by symbol, into a 4-partition topic; then, on every partition,
    one END tick 10 s later, whose watermark closes every real window."""
    admin = AdminClient({"bootstrap.servers": brokers})
    admin.create_topics([NewTopic(topic, num_partitions=4, replication_factor=1)])[topic].result(30)
    producer = Producer({"bootstrap.servers": brokers, "linger.ms": 20, "batch.num.messages": 10000,
                         "queue.buffering.max.messages": 1_000_000})
    lines = ticks.write_ndjson().splitlines()
    for i, (line, key) in enumerate(zip(lines, ticks["symbol"].to_list())):
        producer.produce(topic, line.encode(), key)
        if i % 10000 == 0:
            producer.poll(0)
    for partition in range(4):  # one END key per partition: a key lives in one lane
        end = json.dumps({"symbol": f"{END}{partition}", "ts": int(ticks["ts"].max()) + 10_000, "price": 1.0,
                          "volume": 1})
        producer.produce(topic, end.encode(), f"{END}{partition}", partition=partition)
    assert producer.flush(60) == 0


def outputs(out: Path) -> pl.DataFrame:
    """The windows written so far (files appear as lanes commit)."""
    frames = []
    for f in sorted(out.glob("**/*.parquet")):
        try:
            frames.append(pl.read_parquet(f))
        except (OSError, pl.exceptions.ComputeError):  # being published right now
            continue
    frames = [f for f in frames if f.height]
    return pl.concat(frames).filter(~pl.col("symbol").str.starts_with(END)) if frames else pl.DataFrame()


def _children(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    kids.append(int(entry.name))
            except OSError:
                continue
    return kids


def run(brokers: str, topic: str, workers: int, work: Path, cpu_loops: int, expected: int,
        timeout_s: float) -> tuple[float, pl.DataFrame]:
    """Seconds from `streamfn run [--workers N]` to every window written; then SIGTERM (a drain)."""
    group = f"bench-{uuid.uuid4().hex[:8]}"
    tag = f"{workers}-{group}"
    out = work / f"out-{tag}"
    cmd = [sys.executable, "-m", "streamfn.cli", "run", str(JOB), "--brokers", brokers, "--group", group,
           "--quiet", "--log-format", "json", "--set", "kafka.session.timeout.ms=1000",
           "--set", "kafka.heartbeat.interval.ms=200"]
    if workers > 1:
        cmd += ["--workers", str(workers)]
    env = {**os.environ, "TOPIC": topic, "OUT_DIR": str(out), "RUN_DIR": str(work / f"run-{tag}"),
           "CKPT": str(work / f"checkpoints-{tag}"), "CPU_LOOPS": str(cpu_loops),
           "PYTHONFAULTHANDLER": "1"}
    started = time.perf_counter()
    with open(work / f"log-{tag}.txt", "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = started + timeout_s
            while time.perf_counter() < deadline and proc.poll() is None:
                got = outputs(out)
                if got.height and got.select("symbol", "window_start").unique().height >= expected:
                    break
                time.sleep(0.1)
            seconds = time.perf_counter() - started
            if time.perf_counter() >= deadline:  # stuck: every worker's threads to its log, then stop
                for pid in _children(proc.pid) or [proc.pid]:
                    os.kill(pid, signal.SIGABRT)
                time.sleep(2)
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if code != 0 and seconds < timeout_s:
        raise SystemExit(f"workers={workers} exited {code}; see {work}/log-{tag}.txt")
    return seconds, outputs(out)


def check(got: pl.DataFrame, expected: pl.DataFrame) -> dict[str, int]:
    """Differences from the answer: windows missing, extra (duplicated) and with other values."""
    key = ["symbol", "window_start"]
    if got.is_empty():
        return {"missing": expected.height, "duplicated": 0, "different": 0}
    dup = got.height - got.select(key).unique().height
    joined = expected.join(got.unique(key, keep="last").select(key + ["count", "volume", "vwap"]), on=key,
                           how="left", suffix="_got")
    differ = joined.filter(pl.col("count_got").is_not_null() & (
        (pl.col("count") != pl.col("count_got")) | (pl.col("volume") != pl.col("volume_got"))
        | ((pl.col("vwap") - pl.col("vwap_got")).abs() > 1e-9 * pl.col("vwap").abs())))
    return {"missing": joined["count_got"].null_count(), "duplicated": dup, "different": differ.height}


def main() -> None:
    """Print one JSON line per worker count."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=400_000)
    ap.add_argument("--cpu-loops", type=int, default=8)
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--keep", help="keep the outputs and logs in this folder")
    ap.add_argument("--timeout", type=float, default=120, help="seconds before a run counts as stuck")
    args = ap.parse_args()
    ticks = generate(args.records)
    expected = answer(ticks)
    with tempfile.TemporaryDirectory(prefix="workers-bench-") as scratch:
        tmp = args.keep or scratch
        os.makedirs(tmp, exist_ok=True)
        broker = Broker(log_path=os.path.join(tmp, "tansu.log"))
        try:
            topic = f"ticks-{uuid.uuid4().hex[:8]}"
            produce(broker.bootstrap, topic, ticks)
            for workers in [int(w) for w in args.workers.split(",")]:
                seconds, got = run(broker.bootstrap, topic, workers, Path(tmp), args.cpu_loops, expected.height,
                                   args.timeout)
                problems = check(got, expected)
                print(json.dumps({"workers": workers, "records": args.records, "seconds": round(seconds, 2),
                                  "rec_per_s": round(args.records / seconds), "cpus": os.cpu_count(),
                                  "correct": not any(problems.values()), **problems}), flush=True)
        finally:
            broker.stop()


if __name__ == "__main__":
    main()
