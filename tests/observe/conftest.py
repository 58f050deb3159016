"""Fixtures for the observability tests: in-memory OTel exporters, an unbounded source, a live run."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import polars as pl
import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import streamfn as sf
from streamfn import observe
from streamfn.batch import Position
from streamfn.connectors import memory
from streamfn.contracts import Source, SourcePartition
from streamfn.errors import EndOfInput


@pytest.fixture
def span_exporter() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    """A tracer provider whose spans land in memory as soon as they end."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


class OtlpCollector:
    """A loopback OTLP/HTTP endpoint that keeps every (path, protobuf body) it is sent."""

    def __init__(self) -> None:
        self.received: list[tuple[str, bytes]] = []
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                collector.received.append((self.path, body))
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@pytest.fixture
def otlp_collector() -> Iterator[OtlpCollector]:
    """An OTLP/HTTP receiver on a free loopback port (the real exporters post to it)."""
    collector = OtlpCollector()
    try:
        yield collector
    finally:
        collector.close()


@pytest.fixture
def metric_reader() -> InMemoryMetricReader:
    """A metric reader the test collects from."""
    return InMemoryMetricReader()


class _TickPartition(SourcePartition):
    def __init__(self, source: "TickSource", partition: str, resume: Position) -> None:
        self.source, self.partition = source, partition
        self.pos = int(resume or 0)
        self.last = 0.0

    def next_batch(self, max_rows: int) -> pl.DataFrame | None:
        if self.source.done.is_set():
            raise EndOfInput()
        now = time.monotonic()
        if now - self.last < self.source.every_s:  # not due yet; the runtime backs off and asks again
            return None
        self.last = now
        n = min(self.source.rows, max_rows)
        start = self.pos
        self.pos += n
        frame = pl.DataFrame({"seq": pl.int_range(start, start + n, eager=True),
                              "volume": (pl.int_range(start, start + n, eager=True) % 7)})
        self.source.ctx.report_lag(self.source, self.partition, 1_000 + n)
        return frame

    def position(self) -> Position:
        return self.pos


class TickSource(Source):
    """An unbounded source: every partition makes `rows` rows every `every_s` until `done` is set."""

    def __init__(self, partitions: tuple[str, ...] = ("0", "1"), *, rows: int = 500, every_s: float = 0.02) -> None:
        self._partitions = partitions
        self.rows, self.every_s = rows, every_s
        self.done = threading.Event()
        self.ctx: Any = None

    def default_name(self) -> str:
        return "ticks"

    def start(self, ctx: Any) -> None:
        self.ctx = ctx

    def partitions(self) -> list[str]:
        return list(self._partitions)

    def open(self, partition: str, resume: Position) -> SourcePartition:
        return _TickPartition(self, partition, resume)


def tick_pipeline(run_dir: str, *, name: str = "live", runner: Any = None) -> tuple[sf.Pipeline, TickSource]:
    """ticks -> clean (volume > 0) -> enrich (a derived column) -> memory sink."""
    source = TickSource()
    p = sf.Pipeline(name, run_dir=run_dir, checkpoint_interval=0.2)
    ticks = p.source(source)

    @p.stage(ticks)
    def clean(df: pl.DataFrame) -> pl.DataFrame:
        return df.filter(pl.col("volume") > 0)

    def enrich(df: pl.DataFrame) -> pl.DataFrame:
        return df.with_columns(double=pl.col("volume") * 2)

    if runner is not None:
        enrich.make_runner = runner  # type: ignore[attr-defined]
    p.stage(clean)(enrich).sink(memory.sink(name="out"))
    return p, source


def get(url: str) -> tuple[int, str, bytes]:
    """GET a URL: status code, content type, body (errors included)."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.headers.get("Content-Type", ""), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read()


def get_json(url: str) -> dict[str, Any]:
    """GET a JSON document."""
    code, _, body = get(url)
    assert code == 200, body
    return json.loads(body)  # type: ignore[no-any-return]


def wait_for(check: Callable[[], Any], *, timeout_s: float = 30.0, what: str = "condition") -> Any:
    """Poll until `check()` is truthy; fail with `what` after the timeout (never a timing assertion)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class LiveRun:
    """A tick pipeline running on a thread, observed with a status server on a free port."""

    def __init__(self, run_dir: str, *, make: Callable[[str], tuple[sf.Pipeline, TickSource]] | None = None,
                 **start_options: Any) -> None:
        self.pipeline, self.source = (make or tick_pipeline)(run_dir)
        self.observation = observe.start(self.pipeline, metrics_port=0, sample_interval_s=0.2, **start_options)
        assert self.observation.url is not None
        self.url: str = self.observation.url
        self.summary: Any = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="live-run", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.summary = self.pipeline.run(handle_signals=False)
        except BaseException as exc:  # the test looks at it
            self.error = exc

    def wait_flowing(self) -> dict[str, Any]:
        """Wait until every node shows a non-zero rate and every partition has read rows."""
        def flowing() -> dict[str, Any] | None:
            status = get_json(self.url + "/status")
            rates = [n["rows_out_per_s"] for n in status["nodes"]]
            parts = status["partitions"]
            ready = (status["state"] == "running" and rates and all(r > 0 for r in rates)
                     and len(parts) == len(self.source.partitions())
                     and all(p["rows"] > 0 and p["lag"] is not None for p in parts))
            return status if ready else None
        return wait_for(flowing, what="rows flowing through every node and partition")  # type: ignore[no-any-return]

    def stop(self) -> None:
        """End the source, wait for the run, close the observation."""
        self.source.done.set()
        self.thread.join(timeout=60)
        self.observation.close()


@pytest.fixture
def live_run(run_dir: str) -> Iterator[LiveRun]:
    """A running tick pipeline with /status, /metrics and the dashboard served."""
    run = LiveRun(run_dir)
    try:
        yield run
    finally:
        run.stop()
    assert run.error is None, run.error
