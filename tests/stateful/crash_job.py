"""A windowed pipeline over NDJSON files with checkpoints, run as a subprocess by the crash tests.

    python -m tests.stateful.crash_job INPUT_GLOB OUT_DIR CHECKPOINT_URL RUN_DIR [SETTINGS_JSON]
"""
from __future__ import annotations

import json
import sys
import time

import polars as pl

import streamfn as sf
from streamfn.connectors import files

SCHEMA = {"symbol": pl.String, "ts": pl.Int64, "price": pl.Float64, "volume": pl.Int64}
AGGS = [pl.len().alias("count"), pl.col("volume").sum().alias("volume"),
        ((pl.col("price") * pl.col("volume")).sum() / pl.col("volume").sum()).alias("vwap")]


def build(inp: str, out: str, checkpoint: str, run_dir: str) -> sf.Pipeline:
    """ticks -> volume > 0 (slowed down, so a kill lands mid-stream) -> 1 s windows -> Parquet."""
    p = sf.Pipeline("crash", checkpoint=checkpoint, checkpoint_interval="20ms", run_dir=run_dir,
                    batch_rows=1000, threads=2)
    ticks = p.source(files.ndjson(inp, schema=SCHEMA), name="ticks")

    @p.stage(ticks)
    def traded(df: pl.DataFrame) -> pl.DataFrame:
        time.sleep(0.004)
        return df.filter(pl.col("volume") > 0)

    traded.window(sf.tumbling("1s"), by="symbol", on="ts", aggs=AGGS).sink(files.parquet(out))
    return p


if __name__ == "__main__":
    inp, out, checkpoint, run_dir = sys.argv[1:5]
    settings = json.loads(sys.argv[5]) if len(sys.argv) > 5 else {}
    build(inp, out, checkpoint, run_dir).run(until_idle=True, settings=settings)
