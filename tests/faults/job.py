"""The reference windowed workload over NDJSON files, with checkpoints, run as a worker by the fault tests.

    python -m tests.faults.job INPUT_GLOB OUT_DIR CHECKPOINT_URL RUN_DIR SETTINGS_JSON SLEEP_S

Per-symbol tumbling 1 s windows (count, volume, vwap) of the traded ticks, to Parquet. SLEEP_S
slows each batch down so that faults land mid-stream.
"""
from __future__ import annotations

import json
import sys
import time

import polars as pl
from streamfn.connectors import files

import streamfn as sf
from streamfn.log import configure_logging
from tests.stateful.crash_job import AGGS, SCHEMA

if __name__ == "__main__":
    inp, out, checkpoint, run_dir, settings, sleep_s = sys.argv[1:7]
    configure_logging(log_format="text", level="info")  # with the fields: a retry line says its error
    p = sf.Pipeline("faults", checkpoint=checkpoint, checkpoint_interval="50ms", run_dir=run_dir,
                    batch_rows=500, threads=2)
    ticks = p.source(files.ndjson(inp, schema=SCHEMA), name="ticks")

    @p.stage(ticks)
    def traded(df: pl.DataFrame) -> pl.DataFrame:
        time.sleep(float(sleep_s))
        return df.filter(pl.col("volume") > 0)

    traded.window(sf.tumbling("1s"), by="symbol", on="ts", aggs=AGGS).sink(files.parquet(out))
    p.run(until_idle=True, settings=json.loads(settings))
