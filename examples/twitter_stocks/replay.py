"""Replaying the recorded market: two feeds, quotes and posts, handed out slice by slice.

Trading time is replayed without the nights: the three 6.5-hour sessions become one 19.5-hour
timeline, cut into slices of `speedup * tick_s` market seconds, one per tick of a cron trigger.
`next_quotes()` gives the quotes of the next slice (typed rows), `next_posts()` the posts of
the next slice as the file's raw lines, bad bytes and all, so the pipeline's parsing meets them.

The two feeds are kept in step so that the join of each minute's sentiment to its price window
is exact: posts of a slice are handed out only once every price window up to their last minute
is in the join's table (the pipeline reports the windows it stored with `prices_closed`). The
price windows come from several lanes (one per partition of the quotes topic), so this is
tracked per symbol: a symbol's windows close in order, and the recorded quotes say which
minutes it traded in. Posts run two ticks behind the quotes, so in a healthy run they never
wait long; `wait_s` bounds the wait if the price side stalls.
"""
from __future__ import annotations

import bisect
import logging
import re
import threading
from pathlib import Path

import polars as pl

log = logging.getLogger("streamfn.example.replay")

POSTS_LAG_TICKS = 2
SESSION_S = 23_400  # 09:30-16:00
_TS = re.compile(rb'"ts":\s*"([^"]+)"')
_TS_FORMAT = "%Y-%m-%dT%H:%M:%S%.3fZ"


def _parse_ts(column: str = "ts") -> pl.Expr:
    return pl.col(column).str.to_datetime(_TS_FORMAT, time_zone="UTC", time_unit="ms")


def _slice_of(ts: pl.Expr, first_day: object, step_s: float) -> pl.Expr:
    """The slice a time falls in: trading seconds since the first open (nights left out) / step."""
    day = (ts.dt.date() - pl.lit(first_day)).dt.total_days()
    since_open = (ts - ts.dt.truncate("1d").dt.offset_by("14h30m")).dt.total_milliseconds() / 1000
    return ((day * SESSION_S + since_open) // step_s).cast(pl.Int64)


class Replay:
    """The recorded quotes and posts as slices, one per call of `next_quotes`/`next_posts`."""

    def __init__(self, data: Path, *, speedup: float, tick_s: float, wait_s: float = 10.0) -> None:
        if speedup <= 0 or tick_s <= 0:
            raise ValueError(f"the replay needs speedup > 0 and tick > 0, got {speedup} and {tick_s}")
        self.step_s = speedup * tick_s
        self.wait_s = wait_s
        quotes = pl.read_csv(data / "quotes.csv", schema_overrides={"symbol": pl.String, "ts": pl.String}) \
            .with_columns(_parse_ts())
        lines = (data / "posts.jsonl").read_bytes().split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        # a post's time comes from its own bytes, so lines that are not UTF-8 or not JSON keep their place
        stamps = [m.group(1).decode("ascii", "replace") if (m := _TS.search(line)) else None for line in lines]
        posts = pl.DataFrame({"value": pl.Series(lines, dtype=pl.Binary), "ts": stamps}) \
            .with_columns(pl.col("ts").forward_fill().backward_fill()).with_columns(_parse_ts())
        first_day = quotes["ts"].min().date()  # type: ignore[union-attr]
        self.quotes = quotes.with_columns(_slice_of(pl.col("ts"), first_day, self.step_s).alias("__slice"))
        self.posts = posts.with_columns(_slice_of(pl.col("ts"), first_day, self.step_s).alias("__slice"))
        slices = int(pl.concat([self.quotes["__slice"], self.posts["__slice"]]).max()) + 1  # type: ignore[arg-type]
        # per symbol, the sorted starts (epoch ms) of the minutes it traded in: its price windows
        minutes = quotes.group_by("symbol").agg(pl.col("ts").dt.truncate("1m").dt.epoch("ms").unique().sort())
        self._traded: dict[str, list[int]] = dict(zip(minutes["symbol"], minutes["ts"].to_list()))
        self._closed_end: dict[str, int] = {}  # per symbol: the latest window end stored in the join
        self.quote_ticks = slices
        self.post_ticks = slices + POSTS_LAG_TICKS
        self._quote_tick = 0
        self._post_tick = 0
        self._cond = threading.Condition()

    # -- the two feeds (each called by its own cron trigger) ------------------------------------
    def next_quotes(self) -> pl.DataFrame | None:
        """The quotes of the next slice: ts, symbol, price, volume."""
        tick, self._quote_tick = self._quote_tick, self._quote_tick + 1
        rows = self.quotes.filter(pl.col("__slice") == tick).drop("__slice")
        return rows if rows.height else None

    def next_posts(self) -> pl.DataFrame | None:
        """The raw post lines of the slice two ticks back, once its minutes' prices are closed."""
        tick, self._post_tick = self._post_tick, self._post_tick + 1
        rows = self.posts.filter(pl.col("__slice") == tick - POSTS_LAG_TICKS)
        if rows.height == 0:
            return None
        # the latest minute these posts can close; its price windows must be in the join's table first
        needed = int(rows["ts"].max().timestamp() * 1000) // 60_000 * 60_000  # type: ignore[union-attr]
        with self._cond:
            if not self._cond.wait_for(lambda: not self._behind(needed), timeout=self.wait_s):
                log.warning("the price side is behind; replaying posts without waiting for it", extra={
                    "needed_ms": needed, "symbols_behind": ",".join(self._behind(needed))})
        return rows.select("value")

    def _behind(self, minute_ms: int) -> list[str]:
        """Symbols whose price windows up to this minute are not all in the join's table yet."""
        behind = []
        for symbol, minutes in self._traded.items():
            k = bisect.bisect_right(minutes, minute_ms)  # its last traded minute up to minute_ms
            if k and self._closed_end.get(symbol, -1) < minutes[k - 1] + 60_000:
                behind.append(symbol)
        return behind

    # -- what the pipeline reports back --------------------------------------------------------
    def prices_closed(self, windows: pl.DataFrame) -> None:
        """These price windows (symbol, window_end) are in the join's table, and their symbols' earlier ones too."""
        latest = windows.group_by("symbol").agg(pl.col("window_end").max().dt.epoch("ms"))
        with self._cond:
            for symbol, end in latest.iter_rows():
                if end > self._closed_end.get(symbol, -1):
                    self._closed_end[symbol] = end
            self._cond.notify_all()

    def describe(self) -> str:
        """One line for the log: how much is replayed, in how many ticks."""
        return (f"{self.quotes.height:,} quotes and {self.posts.height:,} posts in {self.quote_ticks} slices "
                f"of {self.step_s:g} market seconds")
