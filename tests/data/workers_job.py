"""The job of the --workers tests: a Kafka topic to NDJSON, one output folder per worker."""
import os
import time

import polars as pl

import streamfn as sf
from streamfn.connectors import files, kafka

worker = os.environ.get("STREAMFN_WORKER_ID", "0")
p = sf.Pipeline("workers", checkpoint_interval="100ms", run_dir=os.path.join(os.environ["RUN_DIR"], worker),
                batch_rows=500)
ticks = p.source(kafka.topic(os.environ["TOPIC"], schema={"id": pl.Int64}, include=["partition"]))


@p.stage(ticks)
def slow(df: pl.DataFrame) -> pl.DataFrame:
    time.sleep(float(os.environ.get("SLOW_S", "0")))
    return df


slow.sink(files.ndjson(os.path.join(os.environ["OUT_DIR"], worker)))
