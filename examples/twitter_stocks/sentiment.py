"""Sentiment scoring and ticker extraction for short posts, on whole batches.

Scoring uses VADER (vaderSentiment), a lexicon- and rule-based model tuned for social media
whose lexicon ships inside its wheel: nothing is downloaded at run time. `compound` is in
[-1, 1]; a post is "bullish" when compound >= threshold, "bearish" when <= -threshold, else
neutral. The threshold comes from the SENTIMENT_THRESHOLD environment variable (VADER's
own convention, 0.05, by default), so a run can be tuned without touching the code.
"""
from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterable
from typing import Any

import polars as pl

from streamfn._optional import import_optional
from streamfn.errors import ConfigError

DEFAULT_THRESHOLD = 0.05
CASHTAG = r"\$([A-Z]{1,5})\b"

_lock = threading.Lock()
_analyzer: Any = None


def threshold_from_env(default: float = DEFAULT_THRESHOLD) -> float:
    """SENTIMENT_THRESHOLD from the environment (a number in [0, 1]), else the default."""
    raw = os.environ.get("SENTIMENT_THRESHOLD")
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"SENTIMENT_THRESHOLD must be a number between 0 and 1, got {raw!r}") from None
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"SENTIMENT_THRESHOLD must be between 0 and 1, got {value}")
    return value


def analyzer() -> Any:
    """The shared VADER analyzer (loading its lexicon once takes ~50 ms)."""
    global _analyzer
    with _lock:
        if _analyzer is None:
            vader = import_optional("vaderSentiment.vaderSentiment", extra="example")
            _analyzer = vader.SentimentIntensityAnalyzer()
        return _analyzer


def compound(texts: pl.Series) -> pl.Series:
    """VADER's compound score of each text (null stays null)."""
    model = analyzer()
    # VADER's rules run per sentence in Python; scoring each distinct text once keeps that cost
    # to the number of distinct posts (templated, retweeted and spam posts repeat a lot).
    distinct = texts.drop_nulls().unique()
    scores = [model.polarity_scores(text)["compound"] for text in distinct.to_list()]
    lookup = pl.DataFrame({"text": distinct, "score": pl.Series(scores, dtype=pl.Float64)})
    joined = pl.DataFrame({"text": texts}).join(lookup, on="text", how="left", maintain_order="left")
    return joined["score"].alias("sentiment")


def score(posts: pl.DataFrame, *, threshold: float, text: str = "text") -> pl.DataFrame:
    """Add `sentiment` (VADER compound), `bullish` and `bearish` (0/1 by the threshold)."""
    return posts.with_columns(compound(posts[text])).with_columns(
        bullish=(pl.col("sentiment") >= threshold).cast(pl.Int32),
        bearish=(pl.col("sentiment") <= -threshold).cast(pl.Int32),
    )


def tickers(text: pl.Expr, symbols: Iterable[str]) -> pl.Expr:
    """The distinct known cashtags ($AAPL) a text mentions, as a list of symbols."""
    known = pl.Series(sorted(set(symbols)), dtype=pl.String)
    found = text.str.extract_all(CASHTAG).list.eval(pl.element().str.slice(1)).list.unique(maintain_order=True)
    return found.list.set_intersection(known.implode()).list.eval(pl.element().sort())


def explode_tickers(posts: pl.DataFrame, symbols: Iterable[str], *, text: str = "text") -> pl.DataFrame:
    """One row per (post, mentioned known symbol); posts with no known symbol are dropped."""
    return (posts.with_columns(tickers(pl.col(text), symbols).alias("symbol"))
            .filter(pl.col("symbol").list.len() > 0).explode("symbol"))


def problem(text: str | None, symbols: Iterable[str]) -> str | None:
    """Why a post's text cannot be scored (None when it can): empty, or about no known ticker."""
    if text is None or not text.strip():
        return "empty post"
    known = set(symbols)
    if not any(tag in known for tag in re.findall(CASHTAG, text)):
        return "post mentions no known ticker"
    return None
