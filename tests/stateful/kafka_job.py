"""A windowed pipeline reading a Kafka topic with checkpoints, run as a subprocess by the crash tests.

    python -m tests.stateful.kafka_job TOPIC GROUP OUT_DIR CHECKPOINT_URL RUN_DIR SETTINGS_JSON
"""
from __future__ import annotations

import json
import sys
import time

import polars as pl

import streamfn as sf
from streamfn.connectors import files, kafka
from tests.stateful.crash_job import AGGS, SCHEMA

if __name__ == "__main__":
    topic, group, out, checkpoint, run_dir, settings = sys.argv[1:7]
    p = sf.Pipeline("kcrash", checkpoint=checkpoint, checkpoint_interval="20ms", run_dir=run_dir,
                    batch_rows=500, threads=4)
    ticks = p.source(kafka.topic(topic, format="json", schema=SCHEMA, key="symbol", group=group,
                                 consume_batch=500), name="ticks")

    @p.stage(ticks)
    def traded(df: pl.DataFrame) -> pl.DataFrame:
        time.sleep(0.004)  # slow enough that a kill lands mid-stream
        return df.filter(pl.col("volume") > 0)

    traded.window(sf.tumbling("1s"), by="symbol", on="ts", aggs=AGGS).sink(files.parquet(out))
    p.run(until_idle=True, settings=json.loads(settings))
