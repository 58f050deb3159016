"""A pipeline run as a child process by the table-sink tests, so that it can be killed with -9.

    python -m tests.connectors._tables_job TARGET INPUT PROGRESS_FILE JSON_OPTIONS

INPUT is an NDJSON file, or kafka:TOPIC (run settings, e.g. the brokers, as JSON in
$TABLES_JOB_SETTINGS; consumer group g-TOPIC). Reads the ticks, keeps volume > 0, adds `notional`, and writes to the target
(postgres | delta | iceberg). After each batch it writes the number of batches done to
PROGRESS_FILE, so the test knows when to kill it. JSON_OPTIONS are the target's arguments.
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time

import polars as pl

import streamfn as sf
from streamfn.connectors import files

SCHEMA = {"symbol": pl.String, "ts": pl.Int64, "price": pl.Float64, "volume": pl.Int64}


def expected(path: str) -> pl.DataFrame:
    """The direct polars computation the table must equal."""
    return transform(pl.read_ndjson(path, schema=SCHEMA))


def transform(df: pl.DataFrame) -> pl.DataFrame:
    """The job's stage."""
    return df.filter(pl.col("volume") > 0).with_columns(notional=pl.col("price") * pl.col("volume"))


def make_sink(target: str, options: dict) -> object:
    """The sink under test."""
    if target == "postgres":
        from streamfn.connectors import postgres
        return postgres.table(**options)
    if target == "delta":
        from streamfn.connectors import delta
        return delta.table(**options)
    from streamfn.connectors import iceberg
    return iceberg.table(**options)


def main(target: str, input_path: str, progress_path: str, options_json: str) -> None:
    options = json.loads(options_json)
    delay_s = float(options.pop("_delay_s", 0.0))
    run_dir = options.pop("_run_dir")
    p = sf.Pipeline("killjob", run_dir=run_dir, batch_rows=2000, checkpoint_interval=0.05, threads=2)
    settings = json.loads(os.environ.get("TABLES_JOB_SETTINGS", "{}"))
    if input_path.startswith("kafka:"):
        from streamfn.connectors import kafka
        topic = input_path[len("kafka:"):]
        src = p.source(kafka.topic(topic, format="json", schema=SCHEMA, group=f"g-{topic}"), name="ticks")
    else:
        src = p.source(files.ndjson(input_path, schema=SCHEMA), name="ticks")
    done = [0]
    lock = threading.Lock()  # two lanes (partitions) run this stage on two threads

    @p.stage(src)
    def enrich(df: pl.DataFrame) -> pl.DataFrame:
        with lock:
            done[0] += 1
            with open(progress_path + ".tmp", "w") as fh:
                fh.write(str(done[0]))
            os.replace(progress_path + ".tmp", progress_path)
        if delay_s:
            time.sleep(delay_s)  # why: keeps the run long enough to be killed in the middle
        return transform(df)

    enrich.sink(make_sink(target, options))
    p.run(until_idle=True, settings=settings)


if __name__ == "__main__":
    main(*sys.argv[1:5])
