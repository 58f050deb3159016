"""A worker process for the consumer-group test: reads a Kafka topic in a group, writes NDJSON files.

    python -m tests.connectors._kafka_worker BROKERS TOPIC GROUP OUT_DIR RUN_DIR
"""
from __future__ import annotations

import sys

import polars as pl

import streamfn as sf
from streamfn.connectors import files, kafka


def main(brokers: str, topic: str, group: str, out_dir: str, run_dir: str) -> int:
    p = sf.Pipeline("kafka-group-worker", checkpoint_interval="0.3s", run_dir=run_dir)
    ticks = p.source(kafka.topic(topic, schema={"id": pl.Int64}, group=group, include=["partition", "offset"]))
    ticks.sink(files.ndjson(out_dir))
    p.run(settings={"kafka.brokers": brokers, "kafka.session.timeout.ms": "1000",
                    "kafka.heartbeat.interval.ms": "200"})
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
