"""NDJSON ticks -> parse -> filter(volume > 0) -> a derived column, streamfn beside plain polars.

    python bench/files_bench.py                 # 2,000,000 ticks in 4 files, 3 runs each, best kept
    python bench/files_bench.py --n 5000000 --files 8 --repeat 1 --sink parquet

Each system runs in its own process so that its peak RSS is its own. The input is the
reference workload of ../shared/bench (workload.py gen), cut into --files files.
Prints one JSON line a run and a Markdown table; the ratio is streamfn / polars.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from ticks_input import make_input  # a sibling module: the benchmarks run as scripts

HERE = Path(__file__).resolve().parent
SCHEMA_NAMES = {"symbol": "String", "ts": "Int64", "price": "Float64", "volume": "Int64"}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_polars(folder: Path) -> dict:
    import polars as pl

    schema = {k: getattr(pl, v) for k, v in SCHEMA_NAMES.items()}
    started = time.perf_counter()
    out = (pl.scan_ndjson(str(folder / "*.jsonl"), schema=schema)
           .filter(pl.col("volume") > 0)
           .with_columns(notional=pl.col("price") * pl.col("volume"))
           .collect())
    seconds = time.perf_counter() - started
    return {"rows_out": out.height, "seconds": seconds}


def run_streamfn(folder: Path, sink: str, threads: int | None) -> dict:
    import polars as pl

    import streamfn as sf
    from streamfn.connectors import files

    class CountSink(sf.Sink):
        """Counts rows (the polars baseline keeps its result in memory and writes nothing)."""

        def __init__(self) -> None:
            self.rows = 0

        def write(self, batch: sf.Batch) -> None:
            self.rows += batch.num_rows  # lanes add under the GIL; += on an int attribute is enough here

        def flush(self, checkpoint_id: str) -> None:
            pass

    schema = {k: getattr(pl, v) for k, v in SCHEMA_NAMES.items()}
    run_dir = f"/tmp/streamfn-bench-{os.getpid()}"
    p = sf.Pipeline("files_bench", run_dir=run_dir, threads=threads)
    ticks = p.source(files.ndjson(str(folder / "*.jsonl"), schema=schema))

    @p.stage(ticks)
    def clean(df: pl.DataFrame) -> pl.DataFrame:
        return df.filter(pl.col("volume") > 0)

    @clean.stage()
    def notional(df: pl.DataFrame) -> pl.DataFrame:
        return df.with_columns(notional=pl.col("price") * pl.col("volume"))

    counter = CountSink()
    if sink == "parquet":
        notional.sink(files.parquet(f"{run_dir}/out"))
    else:
        notional.sink(counter)
    started = time.perf_counter()
    summary = p.run(until_idle=True)
    seconds = time.perf_counter() - started
    return {"rows_out": summary.rows_out("notional"), "seconds": seconds}


def child(args: argparse.Namespace) -> None:
    folder = Path(args.input)
    result = run_polars(folder) if args.mode == "polars" else run_streamfn(folder, args.sink, args.threads)
    records = args.n
    result.update(system=args.mode, records=records, rec_per_s=round(records / result["seconds"]),
                  peak_rss_mb=round(peak_rss_mb(), 1))
    print(json.dumps(result))


def best_of(cmd: list[str], repeat: int) -> dict:
    runs = []
    for _ in range(repeat):
        line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        runs.append(json.loads(line))
        print(line, file=sys.stderr)
    return max(runs, key=lambda r: r["rec_per_s"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2_000_000)
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--sink", choices=["count", "parquet"], default="count")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--data", default=str(HERE / ".data"))
    ap.add_argument("--mode", choices=["polars", "streamfn"], help=argparse.SUPPRESS)
    ap.add_argument("--input", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mode:
        child(args)
        return
    folder = make_input(args.n, args.files, Path(args.data))
    base = [sys.executable, __file__, "--n", str(args.n), "--input", str(folder), "--sink", args.sink]
    if args.threads:
        base += ["--threads", str(args.threads)]
    results = [best_of(base + ["--mode", mode], args.repeat) for mode in ("polars", "streamfn")]
    polars_rate, streamfn_rate = results[0]["rec_per_s"], results[1]["rec_per_s"]
    assert results[0]["rows_out"] == results[1]["rows_out"], "the two systems disagree on the output"
    print(f"\n{args.n:,} ticks in {args.files} NDJSON files, best of {args.repeat}, {os.cpu_count()} CPUs, "
          f"sink={args.sink}\n")
    print("| system | records/s | seconds | peak RSS MB |\n| --- | ---: | ---: | ---: |")
    for r in results:
        name = "polars scan_ndjson().collect()" if r["system"] == "polars" else "streamfn pipeline"
        print(f"| {name} | {r['rec_per_s']:,} | {r['seconds']:.2f} | {r['peak_rss_mb']} |")
    print(f"\nstreamfn / polars = {streamfn_rate / polars_rate:.2f}")


if __name__ == "__main__":
    main()
