"""Stock prices and posts about the same companies: sentiment, 1-minute windows, a join, served.

    streamfn run examples/twitter_stocks/pipeline.py

A cron trigger replays three recorded trading days (data/, made by generate_data.py) into two
Kafka topics, `quotes` and `posts`, at a configurable speed-up. The pipeline reads them back,
scores each post's sentiment (VADER) and finds the tickers it mentions, aggregates per symbol
and minute (price: VWAP, volume, change; posts: mean sentiment, count), joins each minute's
sentiment to its price window, and writes the result to Parquet (by date and symbol) and to
the Kafka topic `symbol_windows`. `GET /symbols/AAPL` answers the latest joined window of a
symbol. Bad posts (empty, not UTF-8, not JSON, about no known ticker) go to the dead letters.

Settings (environment variables, or `--set KEY=VALUE`):
    REPLAY_SPEEDUP       market seconds replayed per second (default 6000: 3 days in about 12 s)
    REPLAY_TICK          how often the replay publishes a slice (default 0.2s)
    SENTIMENT_THRESHOLD  |sentiment| from which a post counts as bullish/bearish (default 0.05)
    RUN_DIR              checkpoints and dead letters (default .streamfn/twitter_stocks)
    OUTPUT_DIR           the Parquet output (default RUN_DIR/output)
    --port               where GET /symbols/{symbol} listens (default 8080)

Without --brokers the run uses an embedded broker, which keeps nothing after the run; the run
then starts from scratch (its old checkpoints and output are removed). With
`--brokers HOST:PORT --checkpoint s3://bucket/path` the same file runs against a real cluster.
"""
import os
import shutil
from pathlib import Path

import polars as pl

import streamfn as sf
from streamfn.connectors import cron, http, kafka
from streamfn.timeparse import parse_duration_s

import sentiment  # this folder's modules (streamfn run puts the pipeline's folder on sys.path)
from replay import Replay
from sinks import partitioned_parquet, summary_table

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
RUN_DIR = os.environ.get("RUN_DIR", ".streamfn/twitter_stocks")
OUTPUT = os.environ.get("OUTPUT_DIR", os.path.join(RUN_DIR, "output"))
SPEEDUP = float(os.environ.get("REPLAY_SPEEDUP", "6000"))
TICK_S = parse_duration_s(os.environ.get("REPLAY_TICK", "0.2s"))
THRESHOLD = sentiment.threshold_from_env()
EMBEDDED = not (os.environ.get("kafka.brokers") or os.environ.get("STREAMFN_KAFKA_BROKERS"))
QUOTE_PARTITIONS = 4

QUOTE_SCHEMA = {"ts": pl.String, "symbol": pl.String, "price": pl.Float64, "volume": pl.Int64}
POST_SCHEMA = {"id": pl.Int64, "ts": pl.String, "user": pl.String, "text": pl.String}
SYMBOLS = sorted(pl.read_csv(DATA / "quotes.csv", columns=["symbol"])["symbol"].unique().to_list())

if EMBEDDED:  # the embedded broker starts empty: so do the checkpoints and the output
    for stale in (os.path.join(RUN_DIR, "checkpoints"), OUTPUT):
        shutil.rmtree(stale, ignore_errors=True)

p = sf.Pipeline("twitter_stocks", run_dir=RUN_DIR, checkpoint_interval="2s")

# -- 1. the replay: every tick publishes the next slice of the recorded market to Kafka -------------
replay = Replay(DATA, speedup=SPEEDUP, tick_s=TICK_S)
market = p.source(cron.every(TICK_S, replay.next_tick, max_runs=replay.runs, name="replay"))


@p.stage(market)
def quote_messages(df: pl.DataFrame) -> pl.DataFrame:
    """The slice's quotes: JSON values keyed by symbol."""
    return df.filter(pl.col("topic") == "quotes")


@p.stage(market)
def post_messages(df: pl.DataFrame) -> pl.DataFrame:
    """The slice's posts: the raw lines, as they were recorded."""
    return df.filter(pl.col("topic") == "posts")


quote_messages.sink(kafka.topic("quotes", format="raw", key="key", create=True, partitions=QUOTE_PARTITIONS),
                    name="quotes_topic")
post_messages.sink(kafka.topic("posts", format="raw", create=True), name="posts_topic")

# -- 2. reading them back: prices per symbol and minute ---------------------------------------------
quotes_in = p.source(kafka.topic("quotes", schema=QUOTE_SCHEMA, key="symbol", create=True,
                                 partitions=QUOTE_PARTITIONS), name="quotes_in")
posts_in = p.source(kafka.topic("posts", schema=POST_SCHEMA, create=True), name="posts_in")


def event_time(column: str = "ts") -> pl.Expr:
    """An ISO-8601 UTC text column as a datetime."""
    return pl.col(column).str.to_datetime("%Y-%m-%dT%H:%M:%S%.3fZ", time_zone="UTC", time_unit="ms")


@p.stage(quotes_in)
def quotes(df: pl.DataFrame) -> pl.DataFrame:
    """Quotes with their event time and price x volume (for the VWAP)."""
    return df.with_columns(event_time(), pv=pl.col("price") * pl.col("volume"))


price_windows = quotes.window(sf.tumbling("1m"), by="symbol", on="ts", name="price_windows", aggs=[
    pl.len().alias("trades"), pl.col("volume").sum(), pl.col("pv").sum(),
    pl.col("price").first().alias("open"), pl.col("price").last().alias("close"),
    pl.col("price").max().alias("high"), pl.col("price").min().alias("low"),
])


@p.stage(price_windows)
def prices(df: pl.DataFrame) -> pl.DataFrame:
    """Each minute's VWAP and price change in percent."""
    return df.with_columns(
        vwap=pl.col("pv") / pl.col("volume"),
        change_pct=(pl.col("close") / pl.col("open") - 1) * 100,
        date=pl.col("window_start").dt.date(),
    ).drop("pv")


# -- 3. posts: checked, scored, one row per ticker they mention, then windows ---------------------
class BadPost(ValueError):
    """A post that cannot be scored: empty, or about no known ticker."""


@p.stage(posts_in)
def mentions(df: pl.DataFrame) -> pl.DataFrame:
    """One row per (post, ticker) with its sentiment; a bad post raises, so it is dead-lettered."""
    found = df.with_columns(sentiment.tickers(pl.col("text"), SYMBOLS).alias("symbol"))
    bad = found.filter(pl.col("text").is_null() | (pl.col("text").str.strip_chars() == "")
                       | (pl.col("symbol").list.len() == 0))
    if bad.height:  # streamfn retries the batch row by row: each bad post lands in the dead letters
        raise BadPost(sentiment.problem(bad["text"][0], SYMBOLS))
    return sentiment.score(found.explode("symbol").with_columns(event_time()), threshold=THRESHOLD)


sentiment_windows = mentions.window(sf.tumbling("1m"), by="symbol", on="ts", name="sentiment_windows", aggs=[
    pl.len().alias("posts"), pl.col("sentiment").mean(),
    pl.col("bullish").sum(), pl.col("bearish").sum(),
])

# -- 4. each minute's sentiment next to its price window ------------------------------------------
price_table = prices.stage(lambda df: df.select("symbol", "window_start", "trades", "volume", "vwap",
                                                "open", "close", "change_pct"), name="price_table")
joined = sentiment_windows.join(price_table, on=["symbol", "window_start"], name="joined")


@p.stage(joined)
def symbol_windows(df: pl.DataFrame) -> pl.DataFrame:
    """The joined rows as they are written and served."""
    return df.select("symbol", "window_start", "window_end", "posts", "sentiment", "bullish", "bearish",
                     "trades", "volume", "vwap", "open", "close", "change_pct",
                     date=pl.col("window_start").dt.date())


# -- 5. outputs ----------------------------------------------------------------------------------
prices.sink(partitioned_parquet(os.path.join(OUTPUT, "prices"), by=["date", "symbol"]), name="prices_parquet")
symbol_windows.sink(partitioned_parquet(os.path.join(OUTPUT, "joined"), by=["date", "symbol"]),
                    name="joined_parquet")
symbol_windows.sink(kafka.topic("symbol_windows", key="symbol", create=True), name="symbol_windows_topic")
p.sink(summary_table(title=f"twitter_stocks: per symbol (sentiment threshold {THRESHOLD:g})", footer=[
    f"Parquet output: {os.path.abspath(OUTPUT)}/prices and .../joined (by date and symbol)",
    f"plot it: python {os.path.relpath(HERE / 'report.py')} --output {OUTPUT}",
]), prices, symbol_windows, name="summary")
