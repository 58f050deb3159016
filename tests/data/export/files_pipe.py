"""Reads IN_DIR's NDJSON files and writes the rows with volume > 0 to OUT_DIR (both from the environment)."""
import os

import polars as pl

import streamfn as sf
from streamfn.connectors import files

p = sf.Pipeline("spec_run", run_dir=os.environ["RUN_DIR"])
ticks = p.source(files.ndjson(os.environ["IN_DIR"] + "/*.jsonl"))


@p.stage(ticks)
def clean(df: pl.DataFrame) -> pl.DataFrame:
    return df.filter(pl.col("volume") > int(os.environ["MIN_VOLUME"]))


clean.sink(files.ndjson(os.environ["OUT_DIR"]))
