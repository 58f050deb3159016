"""examples/twitter_stocks end to end: `streamfn run` on the shipped data, checked against plain polars.

The main run (a subprocess, as a user would start it: embedded broker, SENTIMENT_THRESHOLD=0.5
from the environment) is asked GET /symbols/{symbol} while it runs. Its outputs are compared
with tests/examples/twitter_stocks_reference.py, which recomputes everything from the shipped
files without the example's code: price windows, sentiment windows, the join, counts, dead
letters. A second run uses --brokers (the session's Tansu) and S3 checkpoints (moto), and the
topics it wrote are read back and compared too.
"""
from __future__ import annotations

import base64
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from tests.examples import twitter_stocks_reference as ref

pytestmark = pytest.mark.integration  # the run starts an embedded Kafka broker and an HTTP server

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "twitter_stocks"
THRESHOLD = 0.5
PRICE_COLUMNS = ["trades", "volume", "vwap", "open", "close", "change_pct"]


@dataclass
class Run:
    """What one run of the example left behind."""

    returncode: int
    stdout: str
    stderr: str
    run_dir: Path
    answers: dict[str, list[tuple[int, dict]]] = field(default_factory=dict)

    @property
    def output(self) -> Path:
        return self.run_dir / "output"

    def table(self, name: str) -> pl.DataFrame:
        frame = pl.read_parquet(self.output / name / "**" / "*.parquet", hive_partitioning=True)
        return frame.sort(ref.KEY)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> tuple[int, dict] | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None  # not listening yet, or already stopped


def _ask_while_running(proc: subprocess.Popen[str], port: int, answers: dict[str, list[tuple[int, dict]]]) -> None:
    """Ask for a known and an unknown symbol until the run ends (each answer kept)."""
    while proc.poll() is None:
        for symbol in ("aapl", "ZZZZ"):
            got = _get(f"http://127.0.0.1:{port}/symbols/{symbol}")
            # 503 and "no endpoint": the route is not there yet, or no longer (the run is stopping)
            if got is not None and got[0] != 503 and "no endpoint" not in str(got[1].get("error", "")):
                answers.setdefault(symbol, []).append(got)
        time.sleep(0.2)


def _run_example(run_dir: Path, env_extra: dict[str, str], args: list[str], *, ask_http: bool) -> Run:
    """`python -m streamfn.cli run` the example; with ask_http, query the endpoint while it runs."""
    port = _free_port()
    env = {**os.environ, "RUN_DIR": str(run_dir), "PYTHONUNBUFFERED": "1", **env_extra}
    env.pop("OUTPUT_DIR", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamfn.cli", "run", "examples/twitter_stocks/pipeline.py", "--port", str(port),
         "--log-format", "json", *args], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    answers: dict[str, list[tuple[int, dict]]] = {}
    asker = threading.Thread(target=_ask_while_running, args=(proc, port, answers), daemon=True)
    if ask_http:
        asker.start()
    try:
        stdout, stderr = proc.communicate(timeout=110)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        pytest.fail(f"the example did not end within 110 s\n{stdout}\n{stderr[-3000:]}")
    if ask_http:
        asker.join()
    return Run(proc.returncode, stdout, stderr, run_dir, answers)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """The main job: embedded broker, everything default but the threshold and the replay speed."""
    env = {"SENTIMENT_THRESHOLD": str(THRESHOLD), "REPLAY_SPEEDUP": "12000", "REPLAY_TICK": "0.2s"}
    return _run_example(tmp_path_factory.mktemp("twitter_stocks"), env, [], ask_http=True)


def _summary_rows(stdout: str) -> dict[str, tuple[int, int]]:
    """node -> (rows in, rows out) from the run summary streamfn prints."""
    rows = {}
    for line in stdout.splitlines():
        match = re.match(r"^\s+(\w+)\s+(source|stage|sink)\s+([\d,]+)\s+([\d,]+)\s+([\d,]+)$", line)
        if match:
            rows[match.group(1)] = (int(match.group(3).replace(",", "")), int(match.group(4).replace(",", "")))
    return rows


def test_it_ends_by_itself_and_prints_a_summary_per_symbol(run: Run) -> None:
    assert run.returncode == 0, run.stderr[-3000:]
    table = [line for line in run.stdout.splitlines() if re.match(r"^\| [A-Z]+ +\|", line)]
    assert sorted(line.split("|")[1].strip() for line in table) == ref.symbols()
    assert f"Parquet output: {run.output.resolve()}" in run.stdout
    assert "stopped by end of input" in run.stdout


def test_price_windows_match_plain_polars(run: Run) -> None:
    got = run.table("prices")
    want = ref.price_windows()
    assert got.height == want.height == 20_605
    assert_frame_equal(got.select(ref.KEY + PRICE_COLUMNS + ["high", "low"]),
                       want.select(ref.KEY + PRICE_COLUMNS + ["high", "low"]), check_dtypes=False, rel_tol=1e-9)
    assert (got["date"].cast(pl.String) == got["window_start"].dt.date().cast(pl.String)).all()


def test_sentiment_windows_joined_to_their_price_window(run: Run) -> None:
    got = run.table("joined")
    want = ref.joined(THRESHOLD)
    assert got.height == want.height
    columns = ref.KEY + ["posts", "sentiment", "bullish", "bearish"] + PRICE_COLUMNS
    assert_frame_equal(got.select(columns), want.select(columns), check_dtypes=False, rel_tol=1e-9)
    assert got["vwap"].null_count() == want["vwap"].null_count() > 0  # minutes with posts but no trade


def test_the_threshold_comes_from_the_environment(run: Run) -> None:
    got = run.table("joined")
    assert got["bullish"].sum() == ref.joined(THRESHOLD)["bullish"].sum()
    assert got["bullish"].sum() < ref.joined(0.05)["bullish"].sum()
    assert got["bearish"].sum() < ref.joined(0.05)["bearish"].sum()
    assert "sentiment threshold 0.5" in run.stdout


def test_bad_posts_are_dead_letters_with_their_reason(run: Run) -> None:
    letters = pl.concat([pl.read_ndjson(path, infer_schema_length=None)
                         for path in sorted((run.run_dir / "dead_letters").glob("*.jsonl"))], how="diagonal_relaxed")
    _, bad = ref.judge_posts()
    assert letters.height == bad.height == 46
    assert set(letters["stage"]) == {"posts"} and set(letters["source"]) == {"posts_in"}  # read from Kafka
    reasons = {"not UTF-8": "not UTF-8", "not JSON": "not JSON", "empty": "empty post",
               "no ticker": "no known ticker"}
    for reason, count in bad.group_by("reason").len().iter_rows():
        assert letters.filter(pl.col("error").str.contains(reasons[reason])).height == count, reason
    payloads = sorted(base64.b64decode(p) if e == "base64" else p.encode()
                      for p, e in letters.select("payload", "payload_encoding").iter_rows())
    assert payloads == sorted(bad["raw"].to_list())


def test_counts_of_every_stage_and_kafka_topic(run: Run) -> None:
    rows = _summary_rows(run.stdout)
    good, _ = ref.judge_posts()
    assert rows["quotes_topic"] == (61_932, 61_932)
    assert rows["posts_topic"] == (4_000, 4_000)
    # the analysis reads every record back from the two topics, once
    assert rows["quotes_in"] == rows["quotes"] == (61_932, 61_932)
    assert rows["posts_in"] == (4_000, 4_000)
    assert rows["posts"] == (4_000, good.height)
    assert rows["mentions"][1] == ref.mentions(THRESHOLD).height
    assert rows["sentiment_windows"][1] == ref.sentiment_windows(THRESHOLD).height
    assert rows["symbol_windows_topic"][1] == ref.joined(THRESHOLD).height


def test_http_answers_the_latest_joined_window_of_a_symbol(run: Run) -> None:
    found = [body for status, body in run.answers.get("aapl", []) if status == 200]
    assert found, f"no 200 answer for /symbols/aapl during the run: {run.answers}"
    want = ref.joined(THRESHOLD).filter(pl.col("symbol") == "AAPL")
    for body in found:
        start = pl.Series([body["window_start"]]).str.to_datetime(time_zone="UTC", time_unit="ms")[0]
        row = want.filter(pl.col("window_start") == start)
        assert row.height == 1, body
        assert body["posts"] == row["posts"][0] and body["bullish"] == row["bullish"][0]
        assert body["sentiment"] == pytest.approx(row["sentiment"][0])
        assert body["vwap"] == pytest.approx(row["vwap"][0]) if row["vwap"][0] is not None else body["vwap"] is None
    starts = [body["window_start"] for body in found]
    assert starts == sorted(starts)  # the latest window: it only moves forward
    unknown = run.answers.get("ZZZZ", [])
    assert unknown and all(status == 404 and "no joined window for ZZZZ" in body["error"] for status, body in unknown)


def _read_topic(bootstrap: str, topic: str) -> list[tuple[bytes | None, bytes]]:
    """Every (key, value) of a topic, read from the beginning of each partition to its end."""
    from confluent_kafka import Consumer, KafkaError, TopicPartition
    from confluent_kafka.admin import AdminClient

    partitions = AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=10).topics[topic].partitions
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"check-{topic}", "enable.auto.commit": False,
                         "enable.partition.eof": True})
    consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
    ended: set[int] = set()
    messages: list[tuple[bytes | None, bytes]] = []
    deadline = time.monotonic() + 60
    try:
        while len(ended) < len(partitions) and time.monotonic() < deadline:
            for message in consumer.consume(10_000, timeout=1.0):
                error = message.error()
                if error is not None and error.code() == KafkaError._PARTITION_EOF:
                    ended.add(message.partition())
                elif error is not None:
                    raise AssertionError(f"reading {topic}: {error}")
                else:
                    messages.append((message.key(), message.value()))
    finally:
        consumer.close()
    assert len(ended) == len(partitions), f"{topic}: not every partition was read to its end"
    return messages


def test_with_brokers_and_s3_checkpoints_it_runs_against_a_real_cluster(kafka_tansu, s3_bucket,
                                                                      tmp_path: Path) -> None:
    prefix = kafka_tansu.topic_name("stocks") + "."
    settings = [arg for key, value in s3_bucket.settings().items() for arg in ("--set", f"{key}={value}")]
    done = _run_example(tmp_path, {"REPLAY_SPEEDUP": "40000", "TOPIC_PREFIX": prefix},
                        ["--brokers", kafka_tansu.bootstrap, "--checkpoint", s3_bucket.url("stocks"), *settings],
                        ask_http=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "embedded broker" not in done.stderr
    import boto3

    client = boto3.client("s3", endpoint_url=s3_bucket.endpoint, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket.name)["Contents"]]
    client.close()
    assert any(k.startswith("stocks/quotes_replay/") and "/manifests/" in k for k in keys), keys
    assert not (tmp_path / "checkpoints").exists()
    quotes = _read_topic(kafka_tansu.bootstrap, f"{prefix}quotes")
    got = pl.read_ndjson(b"\n".join(v for _, v in quotes),
                         schema={"ts": pl.Datetime("ms", "UTC"), "symbol": pl.String, "price": pl.Float64,
                                 "volume": pl.Int64})
    assert [k.decode() for k, _ in quotes] == got["symbol"].to_list()  # keyed by symbol
    assert_frame_equal(got.sort("ts", "symbol", "price"), ref.quotes().sort("ts", "symbol", "price"))
    posts = _read_topic(kafka_tansu.bootstrap, f"{prefix}posts")
    assert sorted(v for _, v in posts) == sorted((ref.DATA / "posts.jsonl").read_bytes().split(b"\n")[:-1])
    windows = pl.read_ndjson(b"\n".join(v for _, v in _read_topic(kafka_tansu.bootstrap, f"{prefix}symbol_windows")),
                             schema={"symbol": pl.String, "window_start": pl.Datetime("ms", "UTC"),
                                     "posts": pl.Int64, "sentiment": pl.Float64, "vwap": pl.Float64})
    want = ref.joined(0.05)
    columns = ref.KEY + ["posts", "sentiment", "vwap"]
    assert_frame_equal(windows.sort(ref.KEY).select(columns), want.select(columns), check_dtypes=False,
                       rel_tol=1e-9)


def test_report_draws_a_png_from_the_output(run: Run, tmp_path: Path) -> None:
    png = tmp_path / "report.png"
    done = subprocess.run([sys.executable, str(EXAMPLE / "report.py"), "--output", str(run.output),
                           "--symbols", "AAPL", "TSLA", "--out", str(png)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _code_lines(source: str) -> list[str]:
    """Non-blank code lines, without the notebook's cell markers and its Jupyter fallback for HERE."""
    skip = ("# %% cell", "# Generated by")
    lines = [line.split("  # Jupyter")[0].replace(' if "__file__" in globals() else Path.cwd()', "")
             for line in source.splitlines() if line.strip() and not line.startswith(skip)]
    return lines


def test_the_notebook_holds_the_code_of_pipeline_py() -> None:
    from streamfn.notebook import notebook_to_source

    script = (EXAMPLE / "pipeline.py").read_text(encoding="utf-8")
    body = script[script.index('"""', 3) + 3:]  # after the module docstring
    assert _code_lines(notebook_to_source(str(EXAMPLE / "pipeline.ipynb"))) == _code_lines(body), \
        "pipeline.ipynb differs from pipeline.py: run python examples/twitter_stocks/make_notebook.py"


def test_the_notebook_is_the_same_pipeline(tmp_path: Path) -> None:
    env = {**os.environ, "RUN_DIR": str(tmp_path)}
    kept = tmp_path / "checkpoints" / "an-earlier-run" / "manifest.json"
    kept.parent.mkdir(parents=True)
    kept.write_text("{}")
    graphs = [subprocess.run([sys.executable, "-m", "streamfn.cli", "graph", f"examples/twitter_stocks/{name}"],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
              for name in ("pipeline.py", "pipeline.ipynb")]
    assert [g.returncode for g in graphs] == [0, 0], [g.stderr for g in graphs]
    assert graphs[0].stdout == graphs[1].stdout
    assert "joined                <- sentiment_windows, price_table" in graphs[0].stdout
    assert kept.exists()  # loading the pipeline (graph, a notebook) deletes no state
