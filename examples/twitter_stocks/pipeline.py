"""Stock prices and posts about the same companies: sentiment, 1-minute windows, a join, served.

    streamfn run examples/twitter_stocks/pipeline.py

Two cron triggers replay three recorded trading days (data/, made by generate_data.py) slice
by slice at a configurable speed-up, and publish them to the Kafka topics `quotes` and `posts`,
where live market-data and social feeds would be. The analysis reads both topics back (one
lane per partition) like it would read the live feeds: it scores each post's sentiment
(VADER) and finds the tickers it mentions, aggregates per symbol and minute (price: VWAP,
volume, change; posts: mean sentiment, count, bullish/bearish), joins each minute's sentiment
to its price window, and writes the result to Parquet (by date and symbol) and to the Kafka
topic `symbol_windows`. `GET /symbols/AAPL` answers the latest joined window of a symbol.
Bad posts (not UTF-8, not JSON, empty, about no known ticker) go to the dead letters. The run
ends by itself after the replay and prints a table per symbol.

Settings (environment variables, or `--set KEY=VALUE`):
    REPLAY_SPEEDUP       market seconds replayed per second (default 6000: 3 days in about 12 s)
    REPLAY_TICK          how often the replay publishes a slice (default 0.2s)
    SENTIMENT_THRESHOLD  |sentiment| from which a post counts as bullish/bearish (default 0.05)
    RUN_DIR              checkpoints, dead letters and output (default .streamfn/twitter_stocks)
    OUTPUT_DIR           the Parquet output (default RUN_DIR/output)
    SERVE_AFTER_REPLAY   1: keep answering GET /symbols/{symbol} after the replay, until Ctrl-C
    TOPIC_PREFIX         put before the Kafka topic names (default none)
    --port               where GET /symbols/{symbol} listens (default 8080)

Every run replays the data from the start, so it starts without state: it checkpoints into a
folder of its own (RUN_DIR/checkpoints/<start time>), and it rewrites its output. Without
--brokers the topics live in an embedded broker for the run; with
`--brokers HOST:PORT --checkpoint s3://bucket/path` the same file runs against a real cluster
(give each replay a fresh --checkpoint URL, or --reset-state).
"""
import os
import time
from pathlib import Path

import polars as pl

import streamfn as sf
from streamfn.connectors import cron, files, http, kafka
from streamfn.timeparse import parse_duration_s

import sentiment  # this folder's modules (streamfn run puts the pipeline's folder on sys.path)
from replay import Replay
from sinks import summary_table

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
RUN_DIR = os.environ.get("RUN_DIR", ".streamfn/twitter_stocks")
OUTPUT = os.environ.get("OUTPUT_DIR", os.path.join(RUN_DIR, "output"))
SPEEDUP = float(os.environ.get("REPLAY_SPEEDUP", "6000"))
TICK_S = parse_duration_s(os.environ.get("REPLAY_TICK", "0.2s"))
THRESHOLD = sentiment.threshold_from_env()
SERVE_AFTER_REPLAY = os.environ.get("SERVE_AFTER_REPLAY", "") in ("1", "true", "yes")
TOPIC_PREFIX = os.environ.get("TOPIC_PREFIX", "")
QUOTE_PARTITIONS = 4

QUOTE_SCHEMA = {"ts": pl.Datetime("ms", "UTC"), "symbol": pl.String, "price": pl.Float64, "volume": pl.Int64}
POST_SCHEMA = {"id": pl.Int64, "ts": pl.String, "user": pl.String, "text": pl.String}
SYMBOLS = sorted(pl.read_csv(DATA / "quotes.csv", columns=["symbol"])["symbol"].unique().to_list())
# a replay starts over every time: state an earlier replay checkpointed would make all of it late,
# so each run checkpoints into a folder of its own (`--checkpoint URL` replaces it)
CHECKPOINTS = os.path.join(RUN_DIR, "checkpoints", time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + f"-{os.getpid()}")


def event_time(column: str = "ts") -> pl.Expr:
    """An ISO-8601 UTC text column as a datetime."""
    return pl.col(column).str.to_datetime("%Y-%m-%dT%H:%M:%S%.3fZ", time_zone="UTC", time_unit="ms")


p = sf.Pipeline("twitter_stocks", run_dir=RUN_DIR, checkpoint=CHECKPOINTS, checkpoint_interval="2s")

# -- 1. the replay: two cron triggers hand out the recorded market slice by slice --------------------
replay = Replay(DATA, speedup=SPEEDUP, tick_s=TICK_S)
quotes_feed = p.source(cron.every(TICK_S, replay.next_quotes, max_runs=replay.quote_ticks, name="quotes_replay"))
posts_feed = p.source(cron.every(TICK_S, replay.next_posts, max_runs=replay.post_ticks, name="posts_replay"))

# ...and publish it to Kafka, where the market-data and social feeds would be
quotes_feed.sink(kafka.topic(f"{TOPIC_PREFIX}quotes", key="symbol", create=True, partitions=QUOTE_PARTITIONS),
                 name="quotes_topic")
posts_feed.sink(kafka.topic(f"{TOPIC_PREFIX}posts", format="raw", create=True), name="posts_topic")

# the analysis reads the two feeds back from Kafka; stop_with_writers: each source ends once the
# replay that writes its topic ended and every record it wrote was read, so the run ends by itself
quotes_in = p.source(kafka.topic(f"{TOPIC_PREFIX}quotes", schema=QUOTE_SCHEMA, group="twitter_stocks-quotes",
                                 create=True, partitions=QUOTE_PARTITIONS, stop_with_writers=True), name="quotes_in")
posts_in = p.source(kafka.topic(f"{TOPIC_PREFIX}posts", format="raw", group="twitter_stocks-posts", create=True,
                                stop_with_writers=True), name="posts_in")


# -- 2. prices per symbol and minute ----------------------------------------------------------------
@p.stage(quotes_in)
def quotes(df: pl.DataFrame) -> pl.DataFrame:
    """Quotes with price x volume (for the VWAP)."""
    return df.with_columns(pv=pl.col("price") * pl.col("volume"))


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


# -- 3. posts: parsed, checked, scored, one row per ticker they mention -----------------------------
class BadPost(ValueError):
    """A post that cannot be used: not UTF-8, not JSON, empty, or about no known ticker."""


@p.stage(posts_in)
def posts(df: pl.DataFrame) -> pl.DataFrame:
    """Raw lines -> posts with the tickers they mention; a bad line raises, so it is dead-lettered."""
    # a batch with a bad line raises; streamfn then retries it row by row, and each bad row goes
    # to the dead letters with the reason raised for it (the good rows carry on)
    try:
        text = df["value"].cast(pl.String)
    except (pl.exceptions.ComputeError, pl.exceptions.InvalidOperationError):
        raise BadPost("post is not UTF-8 text") from None
    try:
        parsed = text.str.json_decode(pl.Struct(POST_SCHEMA)).struct.unnest()
    except pl.exceptions.ComputeError as exc:
        raise BadPost(f"post is not JSON: {str(exc).splitlines()[0]}") from None
    found = parsed.with_columns(sentiment.tickers(pl.col("text"), SYMBOLS).alias("symbol"), event_time())
    bad = found.filter(pl.col("text").is_null() | (pl.col("text").str.strip_chars() == "")
                       | (pl.col("symbol").list.len() == 0))
    if bad.height:
        raise BadPost(sentiment.problem(bad["text"][0], SYMBOLS))
    return found


@p.stage(posts)
def mentions(df: pl.DataFrame) -> pl.DataFrame:
    """One row per (post, ticker), with the post's VADER sentiment."""
    return sentiment.score(df.explode("symbol"), threshold=THRESHOLD)


sentiment_windows = mentions.window(sf.tumbling("1m"), by="symbol", on="ts", name="sentiment_windows", aggs=[
    pl.len().alias("posts"), pl.col("sentiment").mean(),
    pl.col("bullish").sum(), pl.col("bearish").sum(),
])

# -- 4. each minute's sentiment next to its price window ------------------------------------------
price_table = prices.stage(lambda df: df.select("symbol", "window_start", "window_end", "trades", "volume",
                                                "vwap", "open", "close", "change_pct"), name="price_table")
joined = sentiment_windows.join(price_table, on=["symbol", "window_start"], name="joined")


@p.stage(price_table)
def prices_joinable(df: pl.DataFrame) -> None:
    """Tell the replay which minutes' prices are in the join's table (it holds posts back until then)."""
    # added after `joined`, so in each quotes lane it runs after the join stored these rows
    replay.prices_closed(df.select("symbol", "window_end"))
    return None


@p.stage(joined)
def symbol_windows(df: pl.DataFrame) -> pl.DataFrame:
    """The joined rows as they are written and served."""
    return df.select("symbol", "window_start", "window_end", "posts", "sentiment", "bullish", "bearish",
                     "trades", "volume", "vwap", "open", "close", "change_pct",
                     date=pl.col("window_start").dt.date())


# -- 5. GET /symbols/{symbol}: the latest joined window of a symbol, from the join's state ----------
# it stops taking requests with the replay (SERVE_AFTER_REPLAY=1 keeps it answering until Ctrl-C)
endpoint = http.endpoint("/symbols/*", method="GET", events=True, timeout="10s",
                         stop_with_input=not SERVE_AFTER_REPLAY)
symbol_requests = p.source(endpoint, name="symbol_requests")


@p.stage(symbol_requests)
def wanted(df: pl.DataFrame) -> pl.DataFrame:
    """The symbol a request asks for (/symbols/aapl -> AAPL); null for any other path."""
    return df.with_columns(symbol=pl.col("path").str.extract(r"^/symbols/([A-Za-z0-9.\-]{1,12})/?$")
                           .str.to_uppercase())


latest = wanted.join(symbol_windows, on="symbol", name="latest_window")
ANSWER = ["symbol", "window_start", "window_end", "posts", "sentiment", "bullish", "bearish",
          "trades", "volume", "vwap", "open", "close", "change_pct"]


@p.stage(latest)
def answer(df: pl.DataFrame) -> pl.DataFrame:
    """200 with the window as JSON, or 404 when the symbol has no joined window (yet)."""
    if "window_start" not in df.columns:  # nothing joined yet: the join's table is still empty
        df = df.with_columns(pl.lit(None).alias(column) for column in ANSWER if column not in df.columns)
    found = pl.col("window_start").is_not_null()
    missing = pl.when(pl.col("symbol").is_null()) \
        .then(pl.lit('{"error": "ask for /symbols/{symbol}, e.g. /symbols/AAPL"}')) \
        .otherwise(pl.concat_str([pl.lit('{"error": "no joined window for '), pl.col("symbol"), pl.lit(' yet"}')]))
    return df.with_columns(
        _http_status=pl.when(found).then(200).otherwise(404),
        _http_body=pl.when(found).then(pl.struct(ANSWER).struct.json_encode()).otherwise(missing).cast(pl.Binary),
        _http_content_type=pl.lit("application/json"),
        _http_headers=pl.lit(None, pl.String),
    )


http.respond(answer)

# -- 6. outputs ----------------------------------------------------------------------------------
prices.sink(files.parquet(os.path.join(OUTPUT, "prices"), partition_by=["date", "symbol"], overwrite=True),
            name="prices_parquet")
symbol_windows.sink(files.parquet(os.path.join(OUTPUT, "joined"), partition_by=["date", "symbol"], overwrite=True),
                    name="joined_parquet")
symbol_windows.sink(kafka.topic(f"{TOPIC_PREFIX}symbol_windows", key="symbol", create=True),
                    name="symbol_windows_topic")
p.sink(summary_table(title=f"twitter_stocks: per symbol (sentiment threshold {THRESHOLD:g})", footer=[
    f"Parquet output: {os.path.abspath(OUTPUT)}/prices and .../joined (by date and symbol)",
    f"plot it: python {os.path.relpath(HERE / 'report.py')} --output {OUTPUT}",
]), prices, symbol_windows, name="summary")
