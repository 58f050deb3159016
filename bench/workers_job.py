"""The job of bench/workers_bench.py: the ticks reference workload from Kafka, with a CPU-bound stage.

The `score` stage does CPU_US microseconds of pure-Python work per record: it holds the GIL, so
one process cannot run it on more than one core, whatever its lane threads do.
"""
import math
import os

import polars as pl

import streamfn as sf
from streamfn.connectors import files, kafka

CPU_LOOPS = int(os.environ.get("CPU_LOOPS", "8"))
worker = os.environ.get("STREAMFN_WORKER_ID", "0")
# one checkpoint URL for every worker: a partition's window state follows it on a rebalance
p = sf.Pipeline("workers_bench", run_dir=os.path.join(os.environ["RUN_DIR"], worker), checkpoint=os.environ["CKPT"],
                checkpoint_interval="1s", batch_rows=int(os.environ.get("BATCH_ROWS", "5000")))
ticks = p.source(kafka.topic(os.environ["TOPIC"], format="json", key="symbol",
                             schema={"symbol": pl.String, "ts": pl.Int64, "price": pl.Float64, "volume": pl.Int64}))


def _score(price: float) -> float:
    x = price
    for _ in range(CPU_LOOPS):
        x = math.sqrt(x * x + 1.0)
    return x


@p.stage(ticks)
def score(df: pl.DataFrame) -> pl.DataFrame:
    df = df.filter(pl.col("volume") > 0)
    return df.with_columns(pl.Series("score", [_score(v) for v in df["price"].to_list()], dtype=pl.Float64))


vwap = score.window(sf.tumbling("1s"), by="symbol", on="ts",
                    aggs=[pl.len().cast(pl.Int64).alias("count"), pl.col("volume").sum().alias("volume"),
                          ((pl.col("price") * pl.col("volume")).sum() / pl.col("volume").sum()).alias("vwap")])
vwap.sink(files.parquet(os.path.join(os.environ["OUT_DIR"], worker)))
