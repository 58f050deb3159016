"""The job of tests/test_multihost.py: running per-symbol aggregates over a Kafka topic, state
checkpointed to S3 (moto). Everything comes from the environment so every worker runs the same file."""
import os
import time

import polars as pl

import streamfn as sf
from streamfn.connectors import files, kafka

p = sf.Pipeline("multihost", checkpoint=os.environ["CKPT"], checkpoint_interval="100ms",
                run_dir=os.environ["RUN_DIR"], batch_rows=200)
ticks = p.source(kafka.topic(os.environ["TOPIC"], format="json", key="symbol",
                             schema={"symbol": pl.String, "volume": pl.Int64}))


@p.stage(ticks)
def slow(df: pl.DataFrame) -> pl.DataFrame:
    time.sleep(0.01)  # slow enough that a kill lands mid-stream
    return df


slow.aggregate(by="symbol", aggs=[pl.len().cast(pl.Int64).alias("n"), pl.col("volume").sum().alias("volume")]) \
    .sink(files.ndjson(os.environ["OUT_DIR"]))
