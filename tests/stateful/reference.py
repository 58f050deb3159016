"""Direct polars computations of what the window stages must emit (the tests' ground truth)."""
from __future__ import annotations

import polars as pl

import streamfn as sf
from streamfn.connectors import memory

AGGS = [pl.len().alias("count"), pl.col("volume").sum().alias("volume"),
        ((pl.col("price") * pl.col("volume")).sum() / pl.col("volume").sum()).alias("vwap"),
        pl.col("price").max().alias("high"), pl.col("price").mean().alias("mean")]
KEYS = ["symbol"]


def expected(df: pl.DataFrame, spec: object) -> pl.DataFrame:
    """The windows of `df` for a spec, computed over all rows at once."""
    if isinstance(spec, sf.windows.Tumbling):
        start = pl.col("ts") // spec.size_ms * spec.size_ms
        framed = df.with_columns(start.alias("window_start"), (start + spec.size_ms).alias("window_end"))
    elif isinstance(spec, sf.windows.Hopping):
        copies = -(-spec.size_ms // spec.every_ms)
        newest = pl.col("ts") // spec.every_ms * spec.every_ms
        framed = pl.concat([df.with_columns((newest - j * spec.every_ms).alias("window_start"))
                            for j in range(copies)])
        framed = framed.with_columns((pl.col("window_start") + spec.size_ms).alias("window_end"))
        framed = framed.filter(pl.col("window_end") > pl.col("ts"))
    elif isinstance(spec, sf.windows.Session):
        ordered = df.sort("symbol", "ts")
        new = (pl.col("symbol") != pl.col("symbol").shift(1)) | (pl.col("ts").diff() >= spec.gap_ms)
        ordered = ordered.with_columns(new.fill_null(True).cum_sum().alias("sid"))
        out = ordered.group_by("symbol", "sid").agg(
            pl.col("ts").min().alias("window_start"), (pl.col("ts").max() + spec.gap_ms).alias("window_end"),
            *AGGS)
        return normal(out.drop("sid"))
    else:  # sliding
        rolled = df.sort("symbol", "ts").rolling(index_column="ts", period=f"{spec.size_ms}i",
                                                 closed="right", group_by="symbol").agg(*AGGS)
        rolled = rolled.with_columns((pl.col("ts") - spec.size_ms).alias("window_start"),
                                     pl.col("ts").alias("window_end")).drop("ts")
        return normal(rolled)
    return normal(framed.group_by("symbol", "window_start", "window_end").agg(*AGGS))


def normal(df: pl.DataFrame) -> pl.DataFrame:
    """Same column order and types, sorted, so frames compare with equals()."""
    cols = ["symbol", "window_start", "window_end", "count", "volume", "vwap", "high", "mean"]
    df = df.select(cols).with_columns(pl.col("count").cast(pl.Int64))
    return df.sort(cols[:3] + ["count", "volume", "high"])


def assert_same(got: pl.DataFrame, want: pl.DataFrame) -> None:
    """Exact on counts, sums and max; floats that come from sums within a relative 1e-9."""
    got, want = normal(got), normal(want)
    assert got.height == want.height, (got, want)
    assert got.select("symbol", "window_start", "window_end", "count", "volume", "high").equals(
        want.select("symbol", "window_start", "window_end", "count", "volume", "high")), (got, want)
    both = pl.DataFrame({"a": got["vwap"], "b": want["vwap"], "c": got["mean"], "d": want["mean"]})
    close = both.select(
        (((pl.col("a") - pl.col("b")).abs() <= 1e-9 * pl.max_horizontal(pl.col("a").abs(), pl.col("b").abs()))
         | (pl.col("a").is_null() & pl.col("b").is_null())).fill_null(False).all(),
        ((pl.col("c") - pl.col("d")).abs() <= 1e-9 * pl.max_horizontal(pl.col("c").abs(), pl.col("d").abs()))
        .fill_null(False).all().alias("m"))
    assert close.row(0) == (True, True), (got, want)


def run_windows(data, spec, *, run_dir: str, batch_rows: int | None = None,
                allowed_lateness: str | float = 0, threads: int = 2) -> tuple[pl.DataFrame, memory.MemorySink]:
    """Run a window pipeline over a memory source; return its output and its dead-letter sink."""
    p = sf.Pipeline("w", run_dir=run_dir, threads=threads)
    src = p.source(memory.source(data, batch_rows=batch_rows))
    out = memory.sink()
    dead = memory.sink(name="dead")
    p.dead_letter(dead)
    src.window(spec, by="symbol", on="ts", aggs=AGGS, allowed_lateness=allowed_lateness).sink(out)
    p.run(until_idle=True, handle_signals=False)
    return out.frame(), dead
