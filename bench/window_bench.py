"""The reference workload through streamfn's window stage, next to the peers, in one run.

    .venv/bin/python bench/window_bench.py [--n 1000000] [--work DIR] [--peers-python PY]
                                           [--skip-peers] [--kafka] [--state-keys 1000000]
                                           [--rekey-files 4]

ticks (NDJSON) -> filter volume > 0 -> per-symbol tumbling 1 s window: count, sum(volume), VWAP,
written as Parquet and checked with the shared bench's `workload.py compare`; then the peers
(polars batched, python loop, bytewax) on the same file, each in its own process; with --kafka,
the same from a 4-partition topic on a local Tansu broker (streamfn, streamfn with the topic
declared keyed by another column so the window reads a repartition topic
(streamfn.stateful.repartition), confluent-kafka + polars, bytewax; Quix Streams is left out:
~7k records/s here, see the shared bench README); with
--rekey-files N, the same rows dealt round-robin over N files, so every symbol is in every file
and the window is re-keyed across the N lanes (streamfn.stateful.exchange); then one
table of records/s, peak RSS and ratios. Last, a checkpoint and a restore of a keyed table of
`--state-keys` keys, full and incremental (1% of the keys changed).

The bench folder of the shared reference workload is found at $BENCH_DIR (default
/work/shared/bench). Bytewax is not a streamfn dependency: pass --peers-python, the python of
an environment with the shared bench's requirements.txt (peers that fail to start are reported).
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

BENCH_DIR = os.environ.get("BENCH_DIR", "/work/shared/bench")
PEERS = [("polars_batched.py", "polars batched"), ("python_loop.py", "python loop"),
         ("bytewax_flow.py", "bytewax")]


def run_streamfn(inp: str, out: str, batch_rows: int) -> None:
    """Child process: run the pipeline and print the shared bench's result line (inp may be a glob)."""
    import glob

    import polars as pl

    import streamfn as sf
    from streamfn.connectors import files

    sys.path.insert(0, BENCH_DIR)
    from common import count_lines, report, write_windows  # the shared bench's helpers

    inputs = sorted(glob.glob(inp))
    records = sum(count_lines(f) for f in inputs)
    parts = tempfile.mkdtemp(prefix="streamfn-bench-")
    started = time.perf_counter()
    p = sf.Pipeline("bench", run_dir=os.path.join(parts, "run"), batch_rows=batch_rows,
                    checkpoint_interval="5s")
    ticks = p.source(files.ndjson(inp, schema={"symbol": pl.String, "ts": pl.Int64, "price": pl.Float64,
                                               "volume": pl.Int64}))

    @p.stage(ticks)
    def traded(df: pl.DataFrame) -> pl.DataFrame:
        return df.filter(pl.col("volume") > 0)

    traded.window(sf.tumbling("1s"), by="symbol", on="ts", aggs=[
        pl.len().alias("count"), pl.col("volume").sum().alias("volume"),
        ((pl.col("price") * pl.col("volume")).sum() / pl.col("volume").sum()).alias("vwap"),
    ]).sink(files.parquet(os.path.join(parts, "out")))
    p.run(until_idle=True, handle_signals=False)
    write_windows(pl.read_parquet(os.path.join(parts, "out", "*.parquet")), out)
    name = "streamfn window" if len(inputs) == 1 else f"streamfn window, re-keyed over {len(inputs)} files"
    report(name, "file", records, time.perf_counter() - started)


def run_streamfn_kafka(brokers: str, topic: str, records: int, out: str, rekey: bool = False) -> None:
    """Child process: the same job from a Kafka topic (4 partitions keyed by symbol, one lane each);
    with rekey, the topic is declared keyed by ts, so the window stage reads a repartition topic."""
    import uuid

    import polars as pl

    import streamfn as sf
    from streamfn.connectors import kafka, memory

    sys.path.insert(0, BENCH_DIR)
    from common import report, write_windows

    parts = tempfile.mkdtemp(prefix="streamfn-bench-kafka-")
    started = time.perf_counter()
    p = sf.Pipeline("bench_kafka", run_dir=os.path.join(parts, "run"), checkpoint_interval="5s")
    ticks = p.source(kafka.topic(topic, format="json", key="ts" if rekey else "symbol",
                                 group=f"bench-{uuid.uuid4().hex[:8]}",
                                 start="earliest", schema={"symbol": pl.String, "ts": pl.Int64,
                                                           "price": pl.Float64, "volume": pl.Int64}))
    sink = memory.sink()  # the windows are few
    traded = ticks.stage(lambda df: df.filter(pl.col("volume") > 0), name="traded")
    traded.window(sf.tumbling("1s"), by="symbol", on="ts", aggs=[
        pl.len().alias("count"), pl.col("volume").sum().alias("volume"),
        ((pl.col("price") * pl.col("volume")).sum() / pl.col("volume").sum()).alias("vwap"),
    ]).sink(sink)
    p.run(until_idle=True, handle_signals=False, settings={
        "kafka.brokers": brokers, "kafka.session.timeout.ms": "1000", "kafka.heartbeat.interval.ms": "200"})
    write_windows(sink.frame(), out)
    name = "streamfn window, through a repartition topic" if rekey else "streamfn window"
    report(name, "kafka", records, time.perf_counter() - started)


def _child(cmd: list[str]) -> dict | None:
    """Run one system in its own process; its result line, or None when it failed."""
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        print(f"FAILED ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-1500:]}", file=sys.stderr)
        return None
    return json.loads(lines[-1])


def _correct(answer: str, out: str) -> str:
    proc = subprocess.run([sys.executable, os.path.join(BENCH_DIR, "workload.py"), "compare", answer, out],
                          capture_output=True, text=True)
    return "yes" if proc.returncode == 0 else "NO: " + proc.stdout.strip()[:300]


def bench_windows(args: argparse.Namespace) -> list[dict]:
    """Generate the input, run streamfn and the peers, check every output."""
    work = args.work or tempfile.mkdtemp(prefix="window-bench-")
    os.makedirs(work, exist_ok=True)
    inp, answer = os.path.join(work, "ticks.jsonl"), os.path.join(work, "answer.parquet")
    workload = os.path.join(BENCH_DIR, "workload.py")
    if not os.path.exists(inp):
        subprocess.run([sys.executable, workload, "gen", str(args.n), inp], check=True)
    subprocess.run([sys.executable, workload, "answer", inp, answer], check=True)
    results = []
    out = os.path.join(work, "streamfn.parquet")
    line = _child([sys.executable, __file__, "--child", inp, out, "--batch-rows", str(args.batch_rows)])
    if line:
        line["correct"] = _correct(answer, out)
        results.append(line)
    if args.rekey_files > 1:
        spread = _deal_lines(inp, os.path.join(work, "spread"), args.rekey_files)
        out = os.path.join(work, "streamfn-rekeyed.parquet")
        line = _child([sys.executable, __file__, "--child", spread, out, "--batch-rows", str(args.batch_rows)])
        if line:
            line["correct"] = _correct(answer, out)
            results.append(line)
    if not args.skip_peers:
        for script, _ in PEERS:
            peer_out = os.path.join(work, script.replace(".py", ".parquet"))
            line = _child([args.peers_python, os.path.join(BENCH_DIR, "peers", script), inp, peer_out])
            if line:
                line["correct"] = _correct(answer, peer_out)
                results.append(line)
    if args.kafka:
        results += bench_kafka(args, work, answer)
    return results


def _deal_lines(inp: str, folder: str, n: int) -> str:
    """Deal the input's lines round-robin into n files (each still in event-time order); their glob."""
    os.makedirs(folder, exist_ok=True)
    with open(inp, "rb") as f:
        lines = f.read().splitlines(keepends=True)
    for i in range(n):
        with open(os.path.join(folder, f"ticks-{i}.jsonl"), "wb") as f:
            f.writelines(lines[i::n])
    return os.path.join(folder, "ticks-*.jsonl")


def bench_kafka(args: argparse.Namespace, work: str, answer: str) -> list[dict]:
    """Start Tansu, load the file into a 4-partition topic, run streamfn and the Kafka peers."""
    inp = os.path.join(work, "ticks.jsonl")
    started = subprocess.run([sys.executable, os.path.join(BENCH_DIR, "brokers.py"), "start", "tansu"],
                             capture_output=True, text=True, check=True, cwd=BENCH_DIR)
    pid, brokers = started.stdout.split()[-2:]
    results = []
    try:
        subprocess.run([sys.executable, os.path.join(BENCH_DIR, "peers", "kafka_produce.py"), inp, "ticks",
                        "--brokers", brokers, "--partitions", "4"], check=True, capture_output=True)
        for rekey in ("", "rekey"):
            out = os.path.join(work, f"streamfn-kafka{rekey}.parquet")
            line = _child([sys.executable, __file__, "--child-kafka", brokers, "ticks", str(args.n), out,
                           *([rekey] if rekey else [])])
            if line:
                line["correct"] = _correct(answer, out)
                results.append(line)
        peers = [] if args.skip_peers else [
            (sys.executable, "kafka_consume_raw.py", ["--brokers", brokers, "--topic", "ticks", "--expect",
                                                      str(args.n), "--mode", "polars", "--out"]),
            (args.peers_python, "bytewax_flow.py", ["--source", "kafka", "--brokers", brokers, "--topic",
                                                    "ticks"]),
        ]
        for python, script, flags in peers:
            peer_out = os.path.join(work, script.replace(".py", "-kafka.parquet"))
            line = _child([python, os.path.join(BENCH_DIR, "peers", script), *flags, peer_out])
            if line:
                line["correct"] = _correct(answer, peer_out)
                results.append(line)
    finally:
        subprocess.run([sys.executable, os.path.join(BENCH_DIR, "brokers.py"), "stop", pid], cwd=BENCH_DIR)
    return results


def print_table(results: list[dict]) -> None:
    """Markdown table with each system's rate relative to streamfn's."""
    print("| system | source | records | records/s | peak RSS MB | streamfn / system | correct |")
    print("| --- | --- | ---: | ---: | ---: | ---: | --- |")
    for r in results:
        ours = next((o for o in results if o["system"].startswith("streamfn") and o["source"] == r["source"]),
                    None)
        ratio = f"{ours['rec_per_s'] / r['rec_per_s']:.2f}x" if ours and r.get("rec_per_s") else ""
        print(f"| {r['system']} | {r['source']} | {r['records']:,} | {r['rec_per_s']:,} | {r['peak_rss_mb']} | {ratio} "
              f"| {r.get('correct', '')} |")


def bench_state(keys: int) -> None:
    """Time a checkpoint (full, then incremental with 1% changed) and a restore of a keyed table."""
    import numpy as np
    import polars as pl

    from streamfn.stateful.checkpoint import Checkpointer
    from streamfn.stateful.store import KeyedTable

    class Runner:
        def __init__(self, table: KeyedTable) -> None:
            self.table = table

        def snapshot(self, cid: str) -> dict:
            return {"table": self.table.snapshot(cid)}

        def restore(self, saved: dict) -> None:
            self.table.restore(saved["table"])

    class Lane:
        def __init__(self, table: KeyedTable) -> None:
            self.source = type("Src", (), {"name": "ticks"})()
            self.partition, self.id, self.position = "0", "ticks[0]", 0
            self.runners = {"state": Runner(table)}

    rng = np.random.default_rng(1)
    table = KeyedTable(["key"])
    table.put(pl.DataFrame({"key": [f"user-{i:08d}" for i in range(keys)], "count": rng.integers(0, 1000, keys),
                            "total": rng.uniform(0, 1e6, keys)}))
    root = tempfile.mkdtemp(prefix="state-bench-")
    ck = Checkpointer(root, pipeline="bench", code_hash="x")
    lane = Lane(table)
    t0 = time.perf_counter()
    ck.save_lane(lane, "00000001")
    full = time.perf_counter() - t0
    changed = rng.choice(keys, keys // 100, replace=False)
    table.put(pl.DataFrame({"key": [f"user-{i:08d}" for i in changed], "count": np.zeros(len(changed), int),
                            "total": np.zeros(len(changed))}))
    t0 = time.perf_counter()
    ck.save_lane(lane, "00000002")
    incremental = time.perf_counter() - t0
    restored = KeyedTable(["key"])
    t0 = time.perf_counter()
    Checkpointer(root, pipeline="bench", code_hash="x").restore_lane(Lane(restored))
    restore = time.perf_counter() - t0
    assert restored.frame().sort("key").equals(table.frame().sort("key"))
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs)
    print(f"\nkeyed state, {keys:,} keys (local disk, Arrow IPC lz4, {size / 2**20:.1f} MiB on disk):")
    print(f"  full checkpoint {full * 1000:.0f} ms; incremental checkpoint (1% changed) "
          f"{incremental * 1000:.0f} ms; restore (base + 1 delta, checksums verified) {restore * 1000:.0f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--work")
    ap.add_argument("--batch-rows", type=int, default=100_000)
    ap.add_argument("--peers-python", default=os.environ.get("BENCH_PEERS_PYTHON", sys.executable))
    ap.add_argument("--skip-peers", action="store_true")
    ap.add_argument("--state-keys", type=int, default=1_000_000)
    ap.add_argument("--kafka", action="store_true", help="also run from a Kafka topic on a local Tansu")
    ap.add_argument("--rekey-files", type=int, default=4,
                    help="also run over the input dealt into this many files (re-keyed); 0 or 1: skip")
    ap.add_argument("--child", nargs=2, metavar=("IN", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--child-kafka", nargs="+", metavar="BROKERS TOPIC N OUT [rekey]", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        run_streamfn(*args.child, batch_rows=args.batch_rows)
        return
    if args.child_kafka:
        brokers, topic, n, out, *rekey = args.child_kafka
        run_streamfn_kafka(brokers, topic, int(n), out, rekey=rekey == ["rekey"])
        return
    results = bench_windows(args)
    print_table(results)
    if args.state_keys:
        bench_state(args.state_keys)
    print(f"\n(bench process peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB)")


if __name__ == "__main__":
    main()
