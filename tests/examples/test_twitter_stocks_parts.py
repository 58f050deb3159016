"""Unit tests of the example's parts: the data generator, the replay and the summary sink."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from datetime import date, datetime, timezone
from pathlib import Path
from types import ModuleType

import polars as pl
import pytest

from streamfn.batch import Batch

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "twitter_stocks"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"twitter_stocks_{name}", EXAMPLE / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


replay_mod = _load("replay")
sinks = _load("sinks")


def test_the_shipped_data_is_what_the_generator_writes(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(EXAMPLE / "generate_data.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for name in ("quotes.csv", "posts.jsonl"):
        assert (tmp_path / name).read_bytes() == (EXAMPLE / "data" / name).read_bytes(), name


def _close(replay: object, symbols: list[str], until: datetime) -> None:
    """Tell the replay these symbols' price windows up to `until` are in the join's table."""
    windows = pl.DataFrame({"symbol": symbols, "window_end": [until] * len(symbols)},
                           schema={"symbol": pl.String, "window_end": pl.Datetime("ms", "UTC")})
    replay.prices_closed(windows)  # type: ignore[attr-defined]


SYMBOLS = sorted(pl.read_csv(EXAMPLE / "data" / "quotes.csv", columns=["symbol"])["symbol"].unique())
LATER = datetime(2030, 1, 1, tzinfo=timezone.utc)


def test_the_replay_hands_out_every_quote_and_post_once_in_time_order() -> None:
    replay = replay_mod.Replay(EXAMPLE / "data", speedup=20_000, tick_s=0.2)
    _close(replay, SYMBOLS, LATER)  # nothing to wait for
    quotes = [replay.next_quotes() for _ in range(replay.quote_ticks)]
    posts = [replay.next_posts() for _ in range(replay.post_ticks)]
    assert replay.next_quotes() is None
    assert posts[0] is None and posts[1] is None  # posts run two ticks behind
    got_quotes = pl.concat([q for q in quotes if q is not None])
    assert got_quotes.height == 61_932 and got_quotes["ts"].is_sorted()
    lines = (EXAMPLE / "data" / "posts.jsonl").read_bytes().split(b"\n")[:-1]
    assert pl.concat([p for p in posts if p is not None])["value"].to_list() == lines


def test_posts_wait_for_their_prices_and_give_up_after_wait_s(caplog: pytest.LogCaptureFixture) -> None:
    replay = replay_mod.Replay(EXAMPLE / "data", speedup=20_000, tick_s=0.2, wait_s=0.05)
    replay.next_posts(), replay.next_posts()
    with caplog.at_level("WARNING"):
        first = replay.next_posts()  # prices closed up to nothing yet: waits 0.05 s, then goes on
    assert first is not None and "price side is behind" in caplog.text


def test_posts_wait_for_the_price_windows_of_every_symbol(caplog: pytest.LogCaptureFixture) -> None:
    # the price windows come from several lanes: each symbol's must be in the join's table
    replay = replay_mod.Replay(EXAMPLE / "data", speedup=20_000, tick_s=0.2, wait_s=0.05)
    _close(replay, [s for s in SYMBOLS if s != "AAPL"], LATER)
    _close(replay, ["AAPL"], datetime(2026, 1, 1, tzinfo=timezone.utc))  # before the first trading day
    replay.next_posts(), replay.next_posts()
    with caplog.at_level("WARNING"):
        assert replay.next_posts() is not None
    assert [r.symbols_behind for r in caplog.records if "price side is behind" in r.getMessage()] == ["AAPL"]
    caplog.clear()
    _close(replay, ["AAPL"], LATER)
    with caplog.at_level("WARNING"):
        assert replay.next_posts() is not None
    assert "price side is behind" not in caplog.text


def _prices(day: int, symbols: list[str]) -> pl.DataFrame:
    start = datetime(2026, 3, day, 14, 30, tzinfo=timezone.utc)
    return pl.DataFrame({"symbol": symbols, "window_start": [start] * len(symbols), "close": [1.0] * len(symbols),
                         "vwap": [1.0] * len(symbols), "volume": [10] * len(symbols),
                         "date": [date(2026, 3, day)] * len(symbols)})


def test_summary_table_per_symbol() -> None:
    import io

    out = io.StringIO()
    table = sinks.SummaryTable(title="t", footer=["where"], out=out)
    table.write(Batch(_prices(2, ["AAPL"]).with_columns(close=pl.lit(5.0)), "prices", "0"))
    table.write(Batch(_prices(3, ["AAPL"]).with_columns(close=pl.lit(7.0), vwap=pl.lit(3.0)), "prices", "0"))
    table.write(Batch(pl.DataFrame({"symbol": ["AAPL", "AAPL"], "posts": [1, 3], "sentiment": [1.0, -1.0],
                                    "vwap": [1.0, None]}), "joined", "0"))
    assert table.table().rows() == [("AAPL", 7.0, 2.0, -0.5, 4)]  # VWAP over both windows, sentiment per post
    table.close()
    assert "| AAPL" in out.getvalue() and "2 sentiment windows, 1 of them joined" in out.getvalue()
