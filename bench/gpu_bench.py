"""The windowed reference workload (per symbol, tumbling 1 s: count, volume, vwap) as a streamfn
stage with engine="cpu" and engine="gpu", on 10M+ rows, printing both rates.

    python bench/gpu_bench.py [--rows 10000000] [--batch-rows 1000000]

Rows are generated in memory the way shared/bench/workload.py generates them (500 symbols, ts +1 ms
per 100 records, price in [10, 1000], volume 0 for ~5%), so the figures measure the stage, not
JSON parsing. The CPU stage is polars; the GPU stage is the same job on cudf (the batch's Arrow
table). Each stage emits per-batch partial aggregates that are merged at the end, and both
results are compared. Without a usable GPU the GPU line says why and the exit code is still 0.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import polars as pl

import streamfn as sf
from streamfn import gpu
from streamfn.connectors import memory

BASE_TS, N_SYMBOLS, RECORDS_PER_MS = 1_700_000_000_000, 500, 100


def generate(rows: int, seed: int = 7) -> pl.DataFrame:
    """The ticks as columns (no JSON)."""
    rng = np.random.default_rng(seed)
    sym = rng.integers(0, N_SYMBOLS, rows)
    return pl.DataFrame({
        "symbol": pl.select(pl.concat_str(pl.lit("SYM"), pl.lit(pl.Series(sym)).cast(pl.String).str.zfill(3)))
                    .to_series(),
        "ts": BASE_TS + np.arange(rows, dtype=np.int64) // RECORDS_PER_MS,
        "price": np.round(rng.uniform(10.0, 1000.0, rows), 4),
        "volume": np.where(rng.random(rows) < 0.05, 0, rng.integers(1, 20000, rows)),
    })


def partials_cpu(df: pl.DataFrame) -> pl.DataFrame:
    """Per (symbol, window) partial sums of one batch, on polars."""
    return (df.filter(pl.col("volume") > 0)
              .group_by("symbol", (pl.col("ts") // 1000 * 1000).alias("window_start"))
              .agg(pl.len().cast(pl.Int64).alias("count"), pl.col("volume").sum().cast(pl.Int64),
                   (pl.col("price") * pl.col("volume")).sum().alias("pv")))


def partials_gpu(df: "cudf.DataFrame") -> "cudf.DataFrame":  # noqa: F821 - cudf only on a GPU machine
    """The same partial sums on cudf."""
    df = df[df["volume"] > 0]
    df["window_start"] = df["ts"] // 1000 * 1000
    df["pv"] = df["price"] * df["volume"]
    out = df.groupby(["symbol", "window_start"], as_index=False).agg(
        count=("volume", "count"), volume=("volume", "sum"), pv=("pv", "sum"))
    return out.astype({"count": "int64", "volume": "int64"})


def finish(parts: pl.DataFrame) -> pl.DataFrame:
    """Merge partials into the workload's output table."""
    return (parts.group_by("symbol", "window_start")
                 .agg(pl.col("count").sum(), pl.col("volume").sum(), pl.col("pv").sum())
                 .with_columns((pl.col("pv") / pl.col("volume")).alias("vwap")).drop("pv")
                 .sort("symbol", "window_start"))


def run(data: pl.DataFrame, engine: str, batch_rows: int) -> tuple[float, pl.DataFrame]:
    """Seconds for the pipeline, and its merged result."""
    p = sf.Pipeline(f"gpu_bench_{engine}", batch_rows=batch_rows, run_dir=f".streamfn/gpu_bench_{engine}")
    src = p.source(memory.source(data, batch_rows=batch_rows))
    out = memory.sink()
    stage = partials_gpu if engine == "gpu" else partials_cpu
    p.stage(src, engine=engine, name="windows")(stage).sink(out)
    started = time.perf_counter()
    p.run(until_idle=True, handle_signals=False)
    seconds = time.perf_counter() - started
    return seconds, finish(out.frame())


def main() -> None:
    """Print one JSON line per engine."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--batch-rows", type=int, default=1_000_000)
    args = ap.parse_args()
    data = generate(args.rows)
    cpu_s, expected = run(data, "cpu", args.batch_rows)
    print(json.dumps({"engine": "cpu", "rows": args.rows, "seconds": round(cpu_s, 3),
                      "rows_per_s": round(args.rows / cpu_s), "windows": expected.height}))
    status = gpu.detect()
    if not status.cudf:
        print(json.dumps({"engine": "gpu", "rows": args.rows, "skipped": status.reason or "cudf not usable"}))
        return
    gpu_s, got = run(data, "gpu", args.batch_rows)
    same = got.select("symbol", "window_start", "count", "volume").equals(
        expected.select("symbol", "window_start", "count", "volume")) and bool(
        ((got["vwap"] - expected["vwap"]).abs() <= 1e-9 * expected["vwap"].abs()).all())
    print(json.dumps({"engine": "gpu", "device": status.device, "rows": args.rows, "seconds": round(gpu_s, 3),
                      "rows_per_s": round(args.rows / gpu_s), "windows": got.height, "same_result": same,
                      "speedup": round(cpu_s / gpu_s, 2)}))


if __name__ == "__main__":
    main()
