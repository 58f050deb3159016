"""Draw price and sentiment over time for a few symbols from the pipeline's Parquet output.

    python examples/twitter_stocks/report.py                       # AAPL TSLA NVDA -> report.png
    python examples/twitter_stocks/report.py --symbols AMZN META --out amzn_meta.png

Reads `<output>/prices` (1-minute price windows) and `<output>/joined` (sentiment windows
joined to their price window), both Hive-partitioned by date and symbol as the pipeline
writes them. Per symbol: the VWAP per minute, and the mean post sentiment per half hour
as bars (green above zero, red below) on a second axis. Trading days are drawn side by
side without the nights in between.
"""
from __future__ import annotations

import argparse
import os
import polars as pl

from streamfn._optional import import_optional

DEFAULT_OUTPUT = os.environ.get("OUTPUT_DIR",  # where pipeline.py writes, with the same settings
                                os.path.join(os.environ.get("RUN_DIR", ".streamfn/twitter_stocks"), "output"))
SENTIMENT_BUCKET = "30m"


def read(output: str, table: str, symbols: list[str]) -> pl.DataFrame:
    """One output table (prices or joined) for these symbols, sorted by time."""
    pattern = os.path.join(output, table, "**", "*.parquet")
    frame = pl.scan_parquet(pattern, hive_partitioning=True).filter(pl.col("symbol").is_in(symbols)).collect()
    if frame.is_empty():
        raise SystemExit(f"no {table} rows for {', '.join(symbols)} under {output}: run the pipeline first "
                         "(streamfn run examples/twitter_stocks/pipeline.py)")
    return frame.sort("symbol", "window_start")


def trading_axis(times: pl.Series) -> tuple[dict[object, int], list[tuple[int, str]]]:
    """Map each minute to a position that skips nights; return the map and one tick per day."""
    minutes = times.unique().sort()
    positions = {t: i for i, t in enumerate(minutes.to_list())}
    days = pl.DataFrame({"t": minutes, "i": range(len(minutes))}).group_by(pl.col("t").dt.date()) \
        .agg(pl.col("i").min()).sort("t")
    return positions, [(i, str(d)) for d, i in days.iter_rows()]


def plot(prices: pl.DataFrame, joined: pl.DataFrame, symbols: list[str], path: str) -> None:
    """Write the chart: one panel per symbol, VWAP line and sentiment bars."""
    matplotlib = import_optional("matplotlib", extra="example")
    matplotlib.use("Agg")  # files only; no display needed
    plt = import_optional("matplotlib.pyplot", extra="example")
    positions, ticks = trading_axis(prices["window_start"])
    fig, axes = plt.subplots(len(symbols), 1, figsize=(11, 2.6 * len(symbols)), sharex=True, squeeze=False)
    for ax, symbol in zip(axes[:, 0], symbols):
        p = prices.filter(pl.col("symbol") == symbol)
        x = [positions[t] for t in p["window_start"].to_list()]
        ax.plot(x, p["vwap"].to_list(), color="#1f4e79", linewidth=0.9, label="VWAP (1 min)")
        ax.set_ylabel(f"{symbol}  price", fontsize=9)
        s = (joined.filter(pl.col("symbol") == symbol)
             .group_by(pl.col("window_start").dt.truncate(SENTIMENT_BUCKET).alias("bucket"))
             .agg((pl.col("sentiment") * pl.col("posts")).sum() / pl.col("posts").sum(), pl.col("posts").sum())
             .sort("bucket"))
        twin = ax.twinx()
        bx = [positions.get(t, None) for t in s["bucket"].to_list()]
        keep = [i for i, v in enumerate(bx) if v is not None]
        values = [s["sentiment"][i] for i in keep]
        twin.bar([bx[i] for i in keep], values, width=25, alpha=0.35,
                 color=["#2e7d32" if v >= 0 else "#c62828" for v in values])
        twin.set_ylim(-1, 1)
        twin.axhline(0, color="grey", linewidth=0.5)
        twin.set_ylabel("sentiment", fontsize=9)
        for i, _ in ticks[1:]:
            ax.axvline(i, color="grey", linewidth=0.5, linestyle=":")
    axes[-1, 0].set_xticks([i for i, _ in ticks], [d for _, d in ticks])
    fig.suptitle("Price (VWAP per minute) and post sentiment (mean per 30 minutes)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    """Read the output and write the PNG."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help="the pipeline's output folder")
    parser.add_argument("--symbols", nargs="+", default=["AAPL", "TSLA", "NVDA"])
    parser.add_argument("--out", default="report.png", help="the PNG to write")
    args = parser.parse_args()
    prices = read(args.output, "prices", args.symbols)
    joined = read(args.output, "joined", args.symbols)
    plot(prices, joined, args.symbols, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
