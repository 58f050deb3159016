"""A windowed pipeline reading a Kafka topic with checkpoints, run as a subprocess by the crash tests.

    python -m tests.stateful.kafka_job TOPIC GROUP OUT_DIR CHECKPOINT_URL RUN_DIR SETTINGS_JSON [follow]

It stops at the end of the topic, or with "follow" runs until SIGTERM. The topic is keyed by
symbol; with JOB_KEY=<column> it is declared keyed by that column, so the window stage (keyed by
symbol) reads a repartition topic. With JOB_FAIL_AT=N the lane of source partition 0 fails in its
Nth checkpoint, after its sinks flushed and before its manifest (its dead-letter flush raises).
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
import uuid

import polars as pl

import streamfn as sf
from streamfn.connectors import kafka
from streamfn.log import configure_logging
from tests.stateful.crash_job import AGGS, SCHEMA


class ParquetParts(sf.Sink):
    """Each lane's rows since the last flush become one Parquet file with a unique name.

    (files.parquet names part files by run and lane and counts from 0 per lane writer, so a lane
    that reopens after a rebalance in the same process would overwrite its earlier files.)
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory
        os.makedirs(directory, exist_ok=True)
        self.pending: dict[str, list[pl.DataFrame]] = {}
        self.lock = threading.Lock()

    def write(self, batch: sf.Batch) -> None:
        with self.lock:
            self.pending.setdefault(batch.partition, []).append(batch.frame)

    def flush(self, checkpoint_id: str) -> None:
        with self.lock:
            pending, self.pending = self.pending, {}
        for frames in pending.values():
            tmp = os.path.join(self.directory, f".{uuid.uuid4().hex}.tmp")
            pl.concat(frames).write_parquet(tmp)
            os.replace(tmp, os.path.join(self.directory, f"part-{uuid.uuid4().hex}.parquet"))


class FailingDeadLetters(sf.Sink):
    """Dead letters that fail the Nth flush of lane ticks[0] (flushed after its other sinks)."""

    def __init__(self, at: int, lane: str = "") -> None:
        self.at, self.lane, self.flushes = at, lane, 0

    def for_lane(self, lane: str) -> FailingDeadLetters:
        return FailingDeadLetters(self.at, lane)

    def write(self, batch: sf.Batch) -> None:
        pass

    def flush(self, checkpoint_id: str) -> None:
        self.flushes += 1
        if self.lane == "ticks[0]" and self.flushes == self.at:
            raise RuntimeError("failing after the sinks flushed, before the checkpoint")


if __name__ == "__main__":
    configure_logging(level=os.environ.get("JOB_LOG", "WARNING"))  # JOB_LOG=INFO shows lanes and restores
    topic, group, out, checkpoint, run_dir, settings = sys.argv[1:7]
    p = sf.Pipeline("kcrash", checkpoint=checkpoint, checkpoint_interval="20ms", run_dir=run_dir,
                    batch_rows=500, threads=4)
    if os.environ.get("JOB_FAIL_AT"):
        p.dead_letter(FailingDeadLetters(int(os.environ["JOB_FAIL_AT"])))
    key = os.environ.get("JOB_KEY", "symbol")
    ticks = p.source(kafka.topic(topic, format="json", schema=SCHEMA, key=key, group=group),
                      name="ticks")

    @p.stage(ticks)
    def traded(df: pl.DataFrame) -> pl.DataFrame:
        time.sleep(0.02)  # slow enough that a kill lands mid-stream
        return df.filter(pl.col("volume") > 0)

    traded.window(sf.tumbling("1s"), by="symbol", on="ts", aggs=AGGS).sink(ParquetParts(out))
    p.run(until_idle=sys.argv[7:] != ["follow"], settings=json.loads(settings))
