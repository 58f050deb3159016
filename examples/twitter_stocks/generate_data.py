"""Generate the example's offline data: stock quotes and short posts about the same companies.

    python examples/twitter_stocks/generate_data.py            # writes data/quotes.csv, data/posts.jsonl

Everything comes from one seeded random generator, so the files are the same on every run
and every machine (the committed files are this script's output). Quotes are trades in
exchange hours (09:30-16:00 New York = 14:30-21:00 UTC in early March) as geometric random
walks with U-shaped intraday volume; posts are English sentences from positive, negative
and neutral templates that mention tickers as cashtags ($AAPL), leaning positive after a
stock went up. About one post in a hundred is bad on purpose (empty, not UTF-8, not JSON,
or about no known ticker): those must end in the pipeline's dead letters.
"""
from __future__ import annotations

import argparse
import json
import os
from datetime import datetime, timedelta, timezone

import numpy as np
import polars as pl

SEED = 20260302
DAYS = ("2026-03-02", "2026-03-03", "2026-03-04")  # Mon-Wed, before the US switch to summer time
OPEN_UTC, MINUTES = (14, 30), 390  # 09:30 EST, 6.5 hours
#: symbol -> (first price, daily volatility, average shares per trade)
SYMBOLS: dict[str, tuple[float, float, int]] = {
    "AAPL": (241.5, 0.016, 900), "MSFT": (398.2, 0.015, 600), "GOOG": (176.8, 0.018, 700),
    "AMZN": (212.4, 0.019, 800), "META": (655.1, 0.022, 400), "TSLA": (284.9, 0.038, 1200),
    "NVDA": (118.3, 0.031, 2500), "JPM": (251.7, 0.013, 500), "V": (346.0, 0.011, 350),
    "JNJ": (162.4, 0.009, 400), "WMT": (96.1, 0.012, 900), "PG": (171.3, 0.009, 350),
    "XOM": (109.8, 0.015, 700), "KO": (70.9, 0.008, 800), "DIS": (111.6, 0.017, 600),
    "NFLX": (978.3, 0.024, 150), "INTC": (22.7, 0.029, 3000), "AMD": (103.4, 0.033, 1800),
    "BA": (172.5, 0.024, 450), "NKE": (77.2, 0.018, 650),
}
TRADES_PER_MINUTE = 3.0  # average; quiet names have minutes without a trade
POSTS = 4000

POSITIVE = (
    "Bullish on ${a}, great earnings beat", "${a} breaking out, love this setup",
    "Just bought more ${a}. Strong momentum!", "${a} up again, fantastic quarter",
    "Impressive guidance from ${a}, very optimistic", "${a} is a winner, happy to hold",
    "Great news for ${a} today, excellent execution", "${a} crushing it, best stock in my portfolio",
    "Loving the rally in ${a}", "${a} looks healthy, buyers are back :)",
)
NEGATIVE = (
    "${a} is tanking, terrible guidance", "Sold all my ${a}, this is awful",
    "${a} down hard, weak demand and bad news", "Worst week ever for ${a} holders",
    "${a} missed estimates, so disappointing", "Worried about ${a}, looks like a crash",
    "${a} is a disaster, avoid", "Ugly selloff in ${a}, painful loss",
    "Not happy with ${a} management at all", "${a} breaking down, fear everywhere :(",
)
NEUTRAL = (
    "${a} trading sideways today", "Anyone watching ${a} into the close?",
    "${a} volume about average", "What is the price target on ${a}?",
    "Holding ${a}, no changes", "${a} reports next week",
    "${a} and ${b} both on my watchlist", "Comparing ${a} with ${b} for a long-term position",
    "${a} opened near yesterday's close", "Reading the ${a} annual report",
)
NO_TICKER = ("Markets are wild today, no idea what to buy", "Coffee first, charts later",
             "Anyone else think rates matter more than earnings?", "$ZZZZ to the moon")


def trading_minutes() -> list[datetime]:
    """Every exchange minute of the generated days, as UTC times."""
    out: list[datetime] = []
    for day in DAYS:
        start = datetime.fromisoformat(day).replace(hour=OPEN_UTC[0], minute=OPEN_UTC[1], tzinfo=timezone.utc)
        out.extend(start + timedelta(minutes=m) for m in range(MINUTES))
    return out


def quotes(rng: np.random.Generator) -> pl.DataFrame:
    """Trades per symbol: a random walk per trade, volumes higher near the open and close."""
    minutes = trading_minutes()
    minute_ms = np.array([int(m.timestamp() * 1000) for m in minutes], dtype=np.int64)
    intraday = np.tile(np.arange(MINUTES), len(DAYS))
    u_shape = 1.0 + 1.5 * (((intraday - MINUTES / 2) / (MINUTES / 2)) ** 2)  # busier at open and close
    frames = []
    for i, (symbol, (price0, daily_vol, shares)) in enumerate(SYMBOLS.items()):
        rate = TRADES_PER_MINUTE * (0.5 + i % 4 * 0.25) * u_shape / u_shape.mean()
        counts = rng.poisson(rate)
        n = int(counts.sum())
        minute_of_trade = np.repeat(np.arange(len(minutes)), counts)
        within = np.sort(minute_of_trade * 60_000 + rng.integers(0, 60_000, n)) % 60_000
        ms = minute_ms[minute_of_trade] + within  # sorted per minute, so trade times increase
        step_vol = daily_vol / np.sqrt(MINUTES * TRADES_PER_MINUTE)
        log_returns = rng.normal(0.0, step_vol, n)
        new_day = np.flatnonzero(np.diff(minute_of_trade // MINUTES)) + 1
        log_returns[new_day] += rng.normal(0.0, daily_vol / 2, len(new_day))  # the overnight gap
        price = np.round(price0 * np.exp(np.cumsum(log_returns)), 2)
        volume = np.maximum(1, np.round(rng.lognormal(np.log(shares), 0.8, n) / 10) * 10).astype(np.int64)
        frames.append(pl.DataFrame({"ts": ms, "symbol": [symbol] * n, "price": price, "volume": volume}))
    frame = pl.concat(frames).with_columns(pl.col("ts").cast(pl.Datetime("ms", "UTC")))
    return frame.sort("ts", "symbol", maintain_order=True)


def _minute_moves(frame: pl.DataFrame) -> dict[tuple[str, int], float]:
    """Per symbol and minute (epoch ms), the relative move over the previous 15 minutes."""
    closes = (frame.group_by("symbol", pl.col("ts").dt.truncate("1m").alias("minute"))
              .agg(pl.col("price").last()).sort("symbol", "minute")
              .with_columns(move=pl.col("price") / pl.col("price").shift(15).over("symbol") - 1))
    return {(s, int(m.timestamp() * 1000)): (mv or 0.0)
            for s, m, mv in closes.select("symbol", "minute", "move").iter_rows()}


def posts(rng: np.random.Generator, frame: pl.DataFrame) -> list[bytes]:
    """Post lines (JSON, one per line), in time order; a few are bad on purpose."""
    moves = _minute_moves(frame)
    symbols = list(SYMBOLS)
    popularity = np.array([3.0 if s in ("AAPL", "TSLA", "NVDA", "META", "AMZN") else 1.0 for s in symbols])
    popularity /= popularity.sum()
    minutes = trading_minutes()
    picks = np.sort(rng.integers(0, len(minutes) * 60, POSTS))
    lines: list[bytes] = []
    for n, second in enumerate(picks):
        ts = minutes[second // 60] + timedelta(seconds=int(second % 60), milliseconds=int(rng.integers(0, 1000)))
        a, b = rng.choice(symbols, size=2, replace=False, p=popularity)
        move = moves.get((a, int(minutes[second // 60].timestamp() * 1000)), 0.0)
        p_pos = float(np.clip(0.375 + move * 40, 0.1, 0.65))  # sentiment follows the price, loosely
        kind = rng.choice(["pos", "neg", "neu"], p=[p_pos, 0.65 - p_pos + 0.1, 0.25])
        templates = {"pos": POSITIVE, "neg": NEGATIVE, "neu": NEUTRAL}[kind]
        text = templates[int(rng.integers(len(templates)))].replace("${a}", f"${a}").replace("${b}", f"${b}")
        record = {"id": n + 1, "ts": ts.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                  "user": f"trader{int(rng.integers(1, 400)):03d}", "text": text}
        bad = rng.random()
        if bad < 0.004:
            record["text"] = "" if bad < 0.002 else "   "
        elif bad < 0.008:
            record["text"] = NO_TICKER[int(rng.integers(len(NO_TICKER)))]
        elif bad < 0.010:  # Latin-1 bytes: not UTF-8
            lines.append(json.dumps(record | {"text": f"Caf\u00e9 talk: {text} \u00e0 bient\u00f4t"},
                                    ensure_ascii=False).encode("latin-1"))
            continue
        elif bad < 0.011:  # cut off mid-record
            lines.append(json.dumps(record).encode()[:-12])
            continue
        lines.append(json.dumps(record, ensure_ascii=False).encode("utf-8"))
    return lines


def main() -> None:
    """Write quotes.csv and posts.jsonl under the given directory."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "data"))
    args = parser.parse_args()
    rng = np.random.default_rng(SEED)
    frame = quotes(rng)
    lines = posts(rng, frame)
    os.makedirs(args.out, exist_ok=True)
    frame.with_columns(pl.col("ts").dt.to_string("%Y-%m-%dT%H:%M:%S%.3fZ")) \
        .write_csv(os.path.join(args.out, "quotes.csv"))
    with open(os.path.join(args.out, "posts.jsonl"), "wb") as out:
        out.write(b"\n".join(lines) + b"\n")
    print(f"{frame.height:,} quotes for {len(SYMBOLS)} symbols and {len(lines):,} posts -> {args.out}")


if __name__ == "__main__":
    main()
