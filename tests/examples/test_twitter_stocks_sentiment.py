"""Unit tests of examples/twitter_stocks/sentiment.py: VADER scores, thresholds, tickers."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from streamfn.errors import ConfigError

_PATH = Path(__file__).resolve().parents[2] / "examples" / "twitter_stocks" / "sentiment.py"
_spec = importlib.util.spec_from_file_location("twitter_stocks_sentiment", _PATH)
assert _spec is not None and _spec.loader is not None
sentiment = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = sentiment
_spec.loader.exec_module(sentiment)

SYMBOLS = ["AAPL", "TSLA", "NVDA"]


def test_scores_have_the_expected_sign_and_match_vader_directly():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    texts = ["Bullish on $AAPL, great earnings beat", "$TSLA is tanking, terrible guidance",
             "$NVDA trading sideways today", "Bullish on $AAPL, great earnings beat"]
    out = sentiment.score(pl.DataFrame({"text": texts}), threshold=0.05)
    direct = SentimentIntensityAnalyzer()
    assert out["sentiment"].to_list() == [direct.polarity_scores(t)["compound"] for t in texts]
    assert out["sentiment"][0] > 0.5 and out["sentiment"][1] < -0.4 and out["sentiment"][2] == 0.0
    assert out["bullish"].to_list() == [1, 0, 0, 1]
    assert out["bearish"].to_list() == [0, 1, 0, 0]


def test_nulls_stay_null_and_order_is_kept():
    texts = pl.Series("text", ["$AAPL awful", None, "$AAPL great", "$AAPL awful"])
    scores = sentiment.compound(texts)
    assert scores.null_count() == 1 and scores[1] is None
    assert scores[0] == scores[3] < 0 < scores[2]


def test_a_higher_threshold_counts_fewer_posts_as_bullish_or_bearish():
    frame = pl.DataFrame({"text": ["$AAPL ok", "$AAPL good", "$AAPL fantastic, love it", "$AAPL bad"]})
    low = sentiment.score(frame, threshold=0.05)
    high = sentiment.score(frame, threshold=0.6)
    assert low["bullish"].sum() > high["bullish"].sum()
    assert low["bearish"].sum() >= high["bearish"].sum()
    assert_frame_equal(low.select("text", "sentiment"), high.select("text", "sentiment"))


def test_threshold_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv("SENTIMENT_THRESHOLD", raising=False)
    assert sentiment.threshold_from_env() == sentiment.DEFAULT_THRESHOLD
    monkeypatch.setenv("SENTIMENT_THRESHOLD", "0.3")
    assert sentiment.threshold_from_env() == 0.3
    for bad in ("lots", "1.5", "-0.1"):
        monkeypatch.setenv("SENTIMENT_THRESHOLD", bad)
        with pytest.raises(ConfigError, match="SENTIMENT_THRESHOLD"):
            sentiment.threshold_from_env()


def test_tickers_are_known_cashtags_one_row_each():
    frame = pl.DataFrame({"id": [1, 2, 3, 4, 5],
                          "text": ["$TSLA vs $AAPL vs $TSLA", "AAPL without a dollar", "$ZZZZ moon",
                                   "$nvda lower case", "$NVDA!"]})
    out = sentiment.explode_tickers(frame, SYMBOLS)
    assert out.select("id", "symbol").rows() == [(1, "AAPL"), (1, "TSLA"), (5, "NVDA")]


@pytest.mark.parametrize(("text", "reason"), [
    ("", "empty post"), ("   ", "empty post"), (None, "empty post"),
    ("no ticker here", "post mentions no known ticker"), ("$ZZZZ to the moon", "post mentions no known ticker"),
    ("$AAPL fine", None),
])
def test_problem_names_why_a_post_cannot_be_scored(text, reason):
    assert sentiment.problem(text, SYMBOLS) == reason
