"""The smallest useful streamfn pipeline: ticks from NDJSON -> clean -> notional -> Parquet.

    streamfn run examples/quickstart/pipeline.py
"""
import os

import polars as pl

import streamfn as sf
from streamfn.connectors import files

HERE = os.path.dirname(os.path.abspath(__file__))
MIN_VOLUME = int(os.environ.get("MIN_VOLUME", "1"))  # change behaviour without code: --set MIN_VOLUME=100

p = sf.Pipeline("quickstart", run_dir=os.path.join(HERE, ".streamfn"))
ticks = p.source(files.ndjson(os.path.join(HERE, "data", "*.jsonl"),
                              schema={"symbol": pl.String, "ts": pl.Int64, "price": pl.Float64, "volume": pl.Int64}),
                 name="ticks")


@p.stage(ticks)
def clean(df: pl.DataFrame) -> pl.DataFrame:
    """Drop ticks without volume."""
    return df.filter(pl.col("volume") >= MIN_VOLUME)


@clean.stage()
def notional(df: pl.DataFrame) -> pl.DataFrame:
    """Add the traded amount."""
    return df.with_columns(notional=pl.col("price") * pl.col("volume"))


notional.sink(files.parquet(os.path.join(HERE, "out", "notional")), name="parquet")
