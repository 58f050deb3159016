"""Kafka throughput: streamfn end to end beside the raw confluent-kafka consume ceiling.

    python bench/kafka_bench.py [--records 2000000] [--partitions 4] [--workdir DIR]

Generates N reference-workload records (../shared/bench/workload.py), produces them to a
4-partition topic on a Tansu broker this script starts (peers/kafka_produce.py), then runs,
one after the other:
  raw:      peers/kafka_consume_raw.py --mode consume (read and count every message)
  streamfn: kafka.topic(json) -> filter(volume > 0) -> a derived column -> kafka.topic(format="arrow")
and prints records/s, peak RSS and CPU seconds of both, and the ratio. Each runs in its own
process; on a busy machine compare CPU seconds as well as rates (rates follow the load).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCH = Path(os.environ.get("STREAMFN_SHARED_BENCH", HERE.parent.parent / "shared" / "bench"))
SESSION = {"kafka.session.timeout.ms": "1000", "kafka.heartbeat.interval.ms": "200"}


def streamfn_job(brokers: str, topic: str, records: int) -> dict[str, object]:
    """Run the streamfn pipeline until the topic is drained; return its result line."""
    import polars as pl

    import streamfn as sf
    from streamfn.connectors import kafka

    schema = {"symbol": pl.String, "ts": pl.Int64, "price": pl.Float64, "volume": pl.Int64}
    p = sf.Pipeline("kafka-bench", checkpoint_interval="5s", run_dir=tempfile.mkdtemp(prefix="kafka-bench-"))
    ticks = p.source(kafka.topic(topic, format="json", schema=schema, group=f"bench-{time.time_ns()}"))

    @p.stage(ticks)
    def trades(df: pl.DataFrame) -> pl.DataFrame:
        return df.filter(pl.col("volume") > 0).with_columns(notional=pl.col("price") * pl.col("volume"))

    trades.sink(kafka.topic(f"{topic}-out", format="arrow", key="symbol", create=True, partitions=4))
    started = time.perf_counter()
    summary = p.run(until_idle=True, settings={"kafka.brokers": brokers, **SESSION})
    seconds = time.perf_counter() - started
    read = summary.rows_in(topic)
    rss = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024
    return {"system": "streamfn kafka json -> filter -> derive -> arrow sink", "records": read,
            "seconds": round(seconds, 3), "rec_per_s": round(read / seconds), "peak_rss_mb": round(rss, 1),
            "rows_out": summary.rows_in(f"{topic}-out"), "expected": records}


def last_json_line(out: str) -> dict[str, object]:
    for line in reversed(out.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)  # type: ignore[no-any-return]
    raise SystemExit(f"no result line in:\n{out}")


def run(cmd: list[str]) -> dict[str, object]:
    """Run one side in its own process; add the CPU seconds it used (all its threads)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    line = last_json_line(done.stdout)
    line["cpu_s"] = round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 2)
    return line


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a running process has used, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=2_000_000, help="records to produce (10000000 for the full run)")
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--workdir", default=None, help="keep the generated input here (default: a temp dir)")
    ap.add_argument("--job", nargs=3, metavar=("BROKERS", "TOPIC", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.job:  # the streamfn side, in its own process
        print(json.dumps(streamfn_job(args.job[0], args.job[1], int(args.job[2]))), flush=True)
        return 0

    from streamfn.connectors.kafka.broker import Broker

    work = Path(args.workdir or tempfile.mkdtemp(prefix="kafka-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / f"ticks-{args.records}.jsonl"
    if not data.exists():
        subprocess.run([sys.executable, str(BENCH / "workload.py"), "gen", str(args.records), str(data)], check=True)
    broker = Broker()
    try:
        topic = "ticks"
        produced = run([sys.executable, str(BENCH / "peers" / "kafka_produce.py"), str(data), topic,
                        "--brokers", broker.bootstrap, "--partitions", str(args.partitions)])
        before = process_cpu_s(broker.proc.pid)
        raw = run([sys.executable, str(BENCH / "peers" / "kafka_consume_raw.py"), "--brokers", broker.bootstrap,
                   "--topic", topic, "--expect", str(args.records), "--mode", "consume"])
        middle = process_cpu_s(broker.proc.pid)
        ours = run([sys.executable, str(Path(__file__)), "--job", broker.bootstrap, topic, str(args.records)])
        raw["broker_cpu_s"] = round(middle - before, 2)
        ours["broker_cpu_s"] = round(process_cpu_s(broker.proc.pid) - middle, 2)
    finally:
        broker.stop()
    print(json.dumps(produced))
    print(json.dumps(raw))
    print(json.dumps(ours))
    ratio = float(ours["rec_per_s"]) / float(raw["rec_per_s"])  # type: ignore[arg-type]
    print(f"records={args.records:,} partitions={args.partitions}")
    print(f"raw consume ceiling : {raw['rec_per_s']:>10,} rec/s  peak RSS {raw['peak_rss_mb']} MB  "
          f"CPU {raw['cpu_s']} s (+ broker {raw['broker_cpu_s']} s)")
    print(f"streamfn end to end : {ours['rec_per_s']:>10,} rec/s  peak RSS {ours['peak_rss_mb']} MB  "
          f"CPU {ours['cpu_s']} s (+ broker {ours['broker_cpu_s']} s)")
    print(f"ratio               : {ratio:.0%} of the raw ceiling")
    return 0 if ours["records"] == args.records else 1


if __name__ == "__main__":
    sys.exit(main())
