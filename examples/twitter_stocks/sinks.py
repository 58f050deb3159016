"""The example's own sink, written against streamfn's Sink contract.

`summary_table(...)`: the last price, the VWAP and the post sentiment per symbol, printed as a
table when the run ends. (The Parquet output is streamfn's `files.parquet(..., partition_by=...)`.)
"""
from __future__ import annotations

import sys
import threading
from collections.abc import Sequence
from typing import TextIO

import polars as pl

from streamfn.batch import Batch
from streamfn.contracts import Sink


class SummaryTable(Sink):
    """Per symbol: the last price, the VWAP and the post sentiment of the run, printed at its end.

    Fed two streams: price windows (they have `vwap`, no `posts`) and sentiment windows
    (they have `posts`); it tells them apart by their columns.
    """

    def __init__(self, *, title: str, footer: Sequence[str] = (), out: TextIO | None = None) -> None:
        self.title, self.footer, self.out = title, list(footer), out
        self._lock = threading.Lock()
        self._prices = pl.DataFrame()
        self._sentiment = pl.DataFrame()
        self._windows = self._with_price = 0

    def default_name(self) -> str:
        return "summary"

    def describe(self) -> str:
        return "summary_table()"

    def write(self, batch: Batch) -> None:
        frame = batch.frame
        with self._lock:
            if "posts" in frame.columns:
                self._windows += frame.height
                if "vwap" in frame.columns:
                    self._with_price += frame.height - frame["vwap"].null_count()
                part = frame.group_by("symbol").agg(
                    posts=pl.col("posts").sum(), weighted=(pl.col("sentiment") * pl.col("posts")).sum())
                self._sentiment = pl.concat([self._sentiment, part]).group_by("symbol").agg(pl.all().sum())
            else:
                part = frame.sort("window_start").group_by("symbol").agg(
                    window_start=pl.col("window_start").last(), last=pl.col("close").last(),
                    pv=(pl.col("vwap") * pl.col("volume")).sum(), volume=pl.col("volume").sum())
                both = pl.concat([self._prices, part]).sort("window_start")
                self._prices = both.group_by("symbol").agg(
                    pl.col("window_start", "last").last(), pl.col("pv", "volume").sum())

    def flush(self, checkpoint_id: str) -> None:
        """Nothing to make durable: the table is printed at the end."""

    def table(self) -> pl.DataFrame:
        """symbol, last price, VWAP over the run, mean post sentiment, posts."""
        with self._lock:
            prices, sentiment = self._prices, self._sentiment
        if prices.is_empty():
            prices = pl.DataFrame(schema={"symbol": pl.String, "last": pl.Float64, "pv": pl.Float64,
                                          "volume": pl.Int64})
        if sentiment.is_empty():
            sentiment = pl.DataFrame(schema={"symbol": pl.String, "posts": pl.Int64, "weighted": pl.Float64})
        return (prices.join(sentiment, on="symbol", how="full", coalesce=True).sort("symbol")
                .select("symbol", pl.col("last").alias("last price"),
                        (pl.col("pv") / pl.col("volume")).round(2).alias("VWAP"),
                        (pl.col("weighted") / pl.col("posts")).round(3).alias("sentiment"),
                        pl.col("posts").fill_null(0)))

    def close(self) -> None:
        out = self.out or sys.stdout
        table = markdown(self.table(), decimals={"last price": 2, "VWAP": 2, "sentiment": 3})
        print(f"\n{self.title}\n{table}", file=out)
        print(f"{self._windows:,} sentiment windows, {self._with_price:,} of them joined to a price window "
              "(the others: minutes with posts but no trade)", file=out)
        for line in self.footer:
            print(line, file=out)
        out.flush()


def markdown(frame: pl.DataFrame, decimals: dict[str, int] | None = None) -> str:
    """A frame as a Markdown table (text left, numbers right), whatever the terminal's width."""
    places = [(decimals or {}).get(name) for name in frame.columns]

    def text(value: object, digits: int | None) -> str:
        if value is None:
            return ""
        if isinstance(value, float) and digits is not None:
            return f"{value:,.{digits}f}"
        return f"{value:,}" if isinstance(value, int) else str(value)

    cells = [[text(v, d) for v, d in zip(row, places)] for row in frame.iter_rows()]
    numeric = [dtype.is_numeric() for dtype in frame.dtypes]
    widths = [max([len(name)] + [len(row[i]) for row in cells]) for i, name in enumerate(frame.columns)]

    def line(values: list[str]) -> str:
        return "| " + " | ".join(v.rjust(w) if n else v.ljust(w) for v, w, n in zip(values, widths, numeric)) + " |"

    rule = "|" + "|".join("-" * (w + 1) + ":" if n else "-" * (w + 2) for w, n in zip(widths, numeric)) + "|"
    return "\n".join([line(list(frame.columns)), rule, *(line(row) for row in cells)])


def summary_table(*, title: str, footer: Sequence[str] = ()) -> SummaryTable:
    """A sink that prints a per-symbol table (last price, VWAP, sentiment, posts) when the run ends."""
    return SummaryTable(title=title, footer=footer)
