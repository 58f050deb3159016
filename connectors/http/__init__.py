"""The HTTP trigger: requests become batches, and a stage's output can be the response.

    from streamfn.connectors import http

    requests = p.source(http.endpoint("/score", port=8080))

    @p.stage(requests)
    def score(df: pl.DataFrame) -> pl.DataFrame:
        return df.with_columns((pl.col("x") * 2).alias("score"))

    http.respond(score)      # each request gets the rows it produced; without it: 202 + an id
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from streamfn.batch import Batch
from streamfn.contracts import Sink
from streamfn.errors import ConfigError, GraphError
from streamfn.pipeline import Node
from streamfn.timeparse import parse_duration_s

from streamfn.connectors.http.client import invoke
from streamfn.connectors.http.lane import REQUEST_ID, HttpLane
from streamfn.connectors.http.server import HEALTH_PATHS
from streamfn.connectors.http.source import HttpSource

__all__ = ["REQUEST_ID", "HttpSource", "RespondSink", "endpoint", "invoke", "respond"]


def endpoint(path: str = "/", *, port: int | None = None, host: str | None = None,
             method: str | list[str] | None = "POST", schema: Mapping[str, Any] | None = None,
             events: bool = False, lanes: int = 1, max_wait: str | float = "2ms",
             max_batch_rows: int = 10_000, max_body_bytes: int = 10 * 1024 * 1024,
             max_pending: int = 10_000, timeout: str | float = "30s",
             max_requests: int | None = None, token: str | None = None, tls_cert: str | None = None,
             tls_key: str | None = None, rate_limit: str | float | None = None,
             stop_with_input: bool = False) -> HttpSource:
    """A source fed by requests to `path` (a path ending in '/*' takes everything under it).

    Args:
        port, host: where to listen; default the run's `http.port`/`http.host` settings
            (`--port`/`--host`), else 8080 on 127.0.0.1 (loopback). Port 0 picks a free port.
        method: the method(s) accepted; None or "*" accepts any.
        schema: column -> polars type; requests whose rows do not fit get 422 and a dead letter.
        events: one row per request (id, method, path, query, content_type, headers, body,
            timestamp) instead of the decoded body: what `handler(context, event)` stages take.
        lanes: partitions (lanes) requests are spread over, round robin.
        max_wait: how long a request waits for others to share its batch.
        max_batch_rows: the most rows in one batch (a batch is due once this many wait).
        max_body_bytes: larger bodies get 413.
        max_pending: requests waiting per lane before new ones get 503.
        timeout: how long a request waits for its answer before 504.
        max_requests: end the trigger after this many requests (tests, examples, --until-idle).
        token: a token callers must send as `Authorization: Bearer <token>` or `X-API-Key: <token>`
            (else 401): `env:NAME`, `file:PATH`, or the value; default the `http.token` setting.
        tls_cert, tls_key: PEM files; the server then speaks HTTPS (default `http.tls_cert`/`http.tls_key`).
        rate_limit: requests a second this endpoint takes (or 'N/min'); over it, 429 + Retry-After.
        stop_with_input: stop taking requests once the run's other sources have ended, so a
            bounded run that also serves (e.g. a replay with a query endpoint) ends by itself.
    """
    if not path.startswith("/"):
        raise ConfigError(f"an endpoint path starts with '/', got {path!r}")
    if path in HEALTH_PATHS:
        raise ConfigError(f"{path!r} is the server's own health path; choose another")
    if lanes < 1 or max_batch_rows < 1 or max_pending < 1 or max_body_bytes < 1:
        raise ConfigError("lanes, max_batch_rows, max_pending and max_body_bytes must be at least 1")
    methods = None if method in (None, "*") else [m.upper() for m in ([method] if isinstance(method, str)
                                                                        else method)]
    return HttpSource(path, port=port, host=host, methods=methods, schema=schema, events=events,
                      lanes=lanes, max_wait_s=parse_duration_s(max_wait), max_batch_rows=max_batch_rows,
                      max_body_bytes=max_body_bytes, max_pending=max_pending,
                      timeout_s=parse_duration_s(timeout), max_requests=max_requests, token=token,
                      tls_cert=tls_cert, tls_key=tls_key, rate_limit=rate_limit,
                      stop_with_input=stop_with_input)


class RespondSink(Sink):
    """Sends each request the rows of this node that its request produced."""

    def __init__(self, sources: dict[str, HttpSource]) -> None:
        self._sources = sources

    def default_name(self) -> str:
        return "respond"

    def write(self, batch: Batch) -> None:
        source = self._sources.get(batch.source)
        if source is None:
            return
        lane = source._lanes.get(batch.partition)  # noqa: SLF001 - the sink and source are one connector
        if isinstance(lane, HttpLane):
            lane.collect(batch.frame)

    def flush(self, checkpoint_id: str) -> None:
        """Answers go out when the lane's batch is done; nothing to make durable."""

    def describe(self) -> str:
        return f"http.respond({', '.join(self._sources)})"


def respond(node: Node, *, name: str | None = None) -> Node:
    """Answer each request to the HTTP endpoint(s) upstream of `node` with the rows it produced."""
    sources: dict[str, HttpSource] = {n.name: n.connector for n in _upstream_sources(node)
                                       if isinstance(n.connector, HttpSource)}
    if not sources:
        raise GraphError(f"http.respond({node.name!r}): no http.endpoint feeds this node")
    for source_name, source in sources.items():
        source.responds = True
        source.name = source_name
    return node.sink(RespondSink(sources), name=name or f"{node.name}_respond")


def _upstream_sources(node: Node) -> list[Node]:
    seen: dict[str, Node] = {}
    stack = [node]
    while stack:
        current = stack.pop()
        if current.name in seen:
            continue
        seen[current.name] = current
        stack.extend(current.upstreams)
    return [n for n in seen.values() if n.kind == "source"]
