"""Replaying the recorded market: each call hands out the next slice of quotes and posts.

Trading time is replayed without the nights: the three 6.5-hour sessions become one 19.5-hour
timeline, cut into slices of `speedup * tick_s` market seconds, one per tick of the cron
trigger. Every slice becomes Kafka messages (a `topic`, a `key` and a `value` column): quotes
as JSON objects keyed by symbol, posts as the file's raw lines, bad bytes and all, so the
pipeline's own parsing meets them. Posts are handed out two ticks after the quotes of the same
market time, so that a minute's price window is usually closed (and in the join's table) by
the time its sentiment window is; see README.md, "the join".
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import polars as pl

POSTS_LAG_TICKS = 2
_TS = re.compile(rb'"ts":\s*"([^"]+)"')
_TS_FORMAT = "%Y-%m-%dT%H:%M:%S%.3fZ"
MESSAGE_SCHEMA = {"topic": pl.String, "key": pl.String, "value": pl.Binary}


def _trading_seconds(ts: pl.Expr, first_day: pl.Expr) -> pl.Expr:
    """Seconds of trading time since the first session opened (nights and weekends left out)."""
    day = (ts.dt.date() - first_day).dt.total_days()
    since_open = (ts - ts.dt.truncate("1d").dt.offset_by("14h30m")).dt.total_milliseconds() / 1000
    return day * 23_400 + since_open  # 23,400 s = one 6.5-hour session


class Replay:
    """The recorded quotes and posts as slices; `next_tick()` returns the next one as messages."""

    def __init__(self, data: Path, *, speedup: float, tick_s: float) -> None:
        if speedup <= 0 or tick_s <= 0:
            raise ValueError(f"the replay needs speedup > 0 and tick > 0, got {speedup} and {tick_s}")
        self.step_s = speedup * tick_s
        quotes = pl.read_csv(data / "quotes.csv", schema_overrides={"symbol": pl.String, "ts": pl.String})
        lines = (data / "posts.jsonl").read_bytes().split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        # a post's time comes from its own bytes, so lines that are not UTF-8 or not JSON keep their place
        stamps = [m.group(1).decode("ascii", "replace") if (m := _TS.search(line)) else None for line in lines]
        posts = pl.DataFrame({"value": pl.Series(lines, dtype=pl.Binary), "ts": stamps}) \
            .with_columns(pl.col("ts").forward_fill().backward_fill())
        first_day = pl.lit(quotes["ts"].str.to_datetime(_TS_FORMAT, time_zone="UTC").min()).dt.date()
        tick = lambda frame: frame.with_columns(  # noqa: E731 - one expression, used twice
            (_trading_seconds(pl.col("ts").str.to_datetime(_TS_FORMAT, time_zone="UTC"), first_day)
             // self.step_s).cast(pl.Int64).alias("__tick"))
        self.quotes = tick(quotes).select(
            "__tick", pl.lit("quotes").alias("topic"), pl.col("symbol").alias("key"),
            pl.struct("ts", "symbol", "price", "volume").struct.json_encode().cast(pl.Binary).alias("value"))
        self.posts = tick(posts).select(
            (pl.col("__tick") + POSTS_LAG_TICKS).alias("__tick"), pl.lit("posts").alias("topic"),
            pl.lit(None, pl.String).alias("key"), "value")
        last = max(int(self.quotes["__tick"].max() or 0), int(self.posts["__tick"].max() or 0))
        self.runs = last + 1
        self.tick = 0

    def next_tick(self) -> pl.DataFrame:
        """The messages of the next tick (quotes of this slice, posts of an earlier one)."""
        tick, self.tick = self.tick, self.tick + 1
        out = pl.concat([self.quotes.filter(pl.col("__tick") == tick),
                         self.posts.filter(pl.col("__tick") == tick)]).drop("__tick")
        return out.cast(MESSAGE_SCHEMA)  # type: ignore[arg-type]

    def describe(self) -> str:
        """One line for the log: how much is replayed, in how many ticks."""
        return (f"{self.quotes.height:,} quotes and {self.posts.height:,} posts in {self.runs} ticks of "
                f"{self.step_s:g} market seconds")


def ticks_for(speedup: float, tick_s: float, trading_s: float = 3 * 23_400) -> int:
    """How many ticks a replay of `trading_s` market seconds takes (for docs and tests)."""
    return math.ceil(trading_s / (speedup * tick_s)) + POSTS_LAG_TICKS
