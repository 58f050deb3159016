"""What examples/twitter_stocks should compute, done again in plain polars over the shipped files.

Independent of the example's code on purpose: the posts file is split into lines and judged
here, sentiment is VADER called directly, and the windows are plain group-bys on the
minute. The end-to-end test compares the pipeline's output with these frames.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import polars as pl

DATA = Path(__file__).resolve().parents[2] / "examples" / "twitter_stocks" / "data"
KEY = ["symbol", "window_start"]


def quotes(data: Path = DATA) -> pl.DataFrame:
    """The shipped quotes, with `ts` as a UTC datetime."""
    return pl.read_csv(data / "quotes.csv", schema_overrides={"symbol": pl.String}).with_columns(
        pl.col("ts").str.to_datetime("%Y-%m-%dT%H:%M:%S%.3fZ", time_zone="UTC", time_unit="ms"))


def symbols(data: Path = DATA) -> list[str]:
    """The symbols that have quotes."""
    return sorted(quotes(data)["symbol"].unique().to_list())


def judge_posts(data: Path = DATA) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(good posts, bad lines with a reason): bad = not UTF-8, not JSON, empty, no known ticker."""
    known = set(symbols(data))
    good: list[dict[str, object]] = []
    bad: list[dict[str, object]] = []
    for number, raw in enumerate((data / "posts.jsonl").read_bytes().split(b"\n")[:-1]):
        try:
            record = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            bad.append({"line": number, "reason": "not UTF-8", "raw": raw})
            continue
        except json.JSONDecodeError:
            bad.append({"line": number, "reason": "not JSON", "raw": raw})
            continue
        text = record.get("text") or ""
        if not text.strip():
            bad.append({"line": number, "reason": "empty", "raw": raw})
        elif not known & set(re.findall(r"\$([A-Z]{1,5})\b", text)):
            bad.append({"line": number, "reason": "no ticker", "raw": raw})
        else:
            good.append({"line": number, **record})
    good_frame = pl.DataFrame(good).with_columns(
        pl.col("ts").str.to_datetime("%Y-%m-%dT%H:%M:%S%.3fZ", time_zone="UTC", time_unit="ms"))
    return good_frame, pl.DataFrame(bad, schema={"line": pl.Int64, "reason": pl.String, "raw": pl.Binary})


def mentions(threshold: float, data: Path = DATA) -> pl.DataFrame:
    """One row per (good post, known symbol it names), with VADER's compound score."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()
    known = set(symbols(data))
    good, _ = judge_posts(data)
    rows = []
    for post in good.iter_rows(named=True):
        score = analyzer.polarity_scores(post["text"])["compound"]
        for symbol in sorted(known & set(re.findall(r"\$([A-Z]{1,5})\b", post["text"]))):
            rows.append({"id": post["id"], "ts": post["ts"], "symbol": symbol, "sentiment": score,
                         "bullish": int(score >= threshold), "bearish": int(score <= -threshold)})
    return pl.DataFrame(rows).with_columns(pl.col("ts").cast(pl.Datetime("ms", "UTC")))


def price_windows(data: Path = DATA) -> pl.DataFrame:
    """Per symbol and minute: trades, volume, VWAP, first/last price and the change in percent."""
    q = quotes(data).sort("ts", maintain_order=True)
    return (q.group_by("symbol", pl.col("ts").dt.truncate("1m").alias("window_start"), maintain_order=True)
            .agg(trades=pl.len(), volume=pl.col("volume").sum(),
                 vwap=(pl.col("price") * pl.col("volume")).sum() / pl.col("volume").sum(),
                 open=pl.col("price").first(), close=pl.col("price").last(),
                 high=pl.col("price").max(), low=pl.col("price").min())
            .with_columns(change_pct=(pl.col("close") / pl.col("open") - 1) * 100)
            .sort(KEY))


def sentiment_windows(threshold: float, data: Path = DATA) -> pl.DataFrame:
    """Per symbol and minute: post count, mean sentiment, bullish and bearish counts."""
    m = mentions(threshold, data)
    return (m.group_by("symbol", pl.col("ts").dt.truncate("1m").alias("window_start"))
            .agg(posts=pl.len(), sentiment=pl.col("sentiment").mean(),
                 bullish=pl.col("bullish").sum(), bearish=pl.col("bearish").sum())
            .sort(KEY))


def joined(threshold: float, data: Path = DATA) -> pl.DataFrame:
    """Sentiment windows with the price window of the same symbol and minute (null if no trade)."""
    return sentiment_windows(threshold, data).join(price_windows(data), on=KEY, how="left").sort(KEY)
