"""Kafka -> 1 s windows -> a transactional Kafka sink, run as a subprocess by the exactly-once tests.

    python -m tests.stateful.txn_job TOPIC OUT_TOPIC GROUP CHECKPOINT_URL RUN_DIR SETTINGS_JSON [FAIL_AT]

With FAIL_AT=N a lane fails in its commit after its Nth batch of windows: after that checkpoint
was saved, before the Kafka transaction holding the windows commits (the run stops, exit code 1).
(A kill there leaves the same checkpoint and offsets; a failure also leaves the consumer group,
which noida-db needs: it does not expire a killed member.)
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time

import polars as pl

import streamfn as sf
from streamfn.connectors import kafka
from tests.stateful.crash_job import AGGS, SCHEMA


class FailInCommit(sf.Sink):
    """Does nothing but fail the commit of a lane after its Nth write (before the Kafka sink's)."""

    def __init__(self, at: int) -> None:
        self.at, self.writes = at, 0

    def for_lane(self, lane: str) -> FailInCommit:
        return FailInCommit(self.at)

    def write(self, batch: sf.Batch) -> None:
        self.writes += 1

    def flush(self, checkpoint_id: str) -> None:
        pass

    def commit(self, checkpoint_id: str, position: sf.Position) -> None:
        if self.writes >= self.at:
            raise RuntimeError("failing between the checkpoint and the Kafka transaction's commit")


if __name__ == "__main__":
    logging.basicConfig(level=os.environ.get("JOB_LOG", "WARNING"))
    topic, out_topic, group, checkpoint, run_dir, settings = sys.argv[1:7]
    fail_at = int(sys.argv[7]) if len(sys.argv) > 7 else 0
    p = sf.Pipeline("ktxn", checkpoint=checkpoint, checkpoint_interval="20ms", run_dir=run_dir,
                    batch_rows=500, threads=2)
    ticks = p.source(kafka.topic(topic, format="json", schema=SCHEMA, key="symbol", group=group), name="ticks")

    @p.stage(ticks)
    def traded(df: pl.DataFrame) -> pl.DataFrame:
        time.sleep(0.01)
        return df.filter(pl.col("volume") > 0)

    windows = traded.window(sf.tumbling("1s"), by="symbol", on="ts", aggs=AGGS)
    if fail_at:
        windows.sink(FailInCommit(fail_at), name="fail_in_commit")
    windows.sink(kafka.topic(out_topic, format="json", transactional=True, create=True, partitions=2), name="out")
    p.run(until_idle=True, settings=json.loads(settings))
