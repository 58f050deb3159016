"""The HTTP trigger: a Source whose lanes are fed by requests to one path of a shared server."""
from __future__ import annotations

import asyncio
import itertools
import json
import logging
import re
import secrets
import threading
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import polars as pl

from streamfn.batch import Position
from streamfn.contracts import Reject, Source, SourcePartition
from streamfn.deadletter import DeadLetter
from streamfn.errors import ConfigError
from streamfn.observe.tracing import extract_context, tracing_active
from streamfn.secrets import resolve_secret

from streamfn.connectors.http import codec, security, server as servers
from streamfn.connectors.http.lane import Answer, HttpLane, Request, error_answer

if TYPE_CHECKING:
    from streamfn.runtime import RunContext

log = logging.getLogger("streamfn.http")

_BIG_BODY = 256 * 1024  # decoded on a worker thread so the event loop keeps serving
_MAX_DEAD_LETTER_PAYLOAD = 1024 * 1024


class BodyTooLarge(Exception):
    """The request body is over the endpoint's limit."""


class HttpSource(Source):
    """Requests to `path` become rows; see `streamfn.connectors.http.endpoint`."""

    def __init__(self, path: str, *, port: int | None, host: str | None, methods: list[str] | None,
                 schema: codec.Schema | None, events: bool, lanes: int, max_wait_s: float,
                 max_batch_rows: int, max_body_bytes: int, max_pending: int, timeout_s: float,
                 max_requests: int | None, token: str | None = None, tls_cert: str | None = None,
                 tls_key: str | None = None, rate_limit: str | float | None = None,
                 stop_with_input: bool = False) -> None:
        self.token, self.tls_cert, self.tls_key, self.rate_limit = token, tls_cert, tls_key, rate_limit
        self.stop_with_input = stop_with_input
        self.path, self.port, self.host, self.methods = path, port, host, methods
        self.schema, self.events, self.n_lanes = schema, events, lanes
        self.max_wait_s, self.max_batch_rows, self.max_body_bytes = max_wait_s, max_batch_rows, max_body_bytes
        self.max_pending, self.timeout_s, self.max_requests = max_pending, timeout_s, max_requests
        self.responds = False  # set by http.respond()
        self.name = self.default_name()  # for logs; respond() tells the node's name
        self._ctx: RunContext | None = None
        self._server: servers.HttpServer | None = None
        self._lanes: dict[str, HttpLane] = {}
        self._order: list[HttpLane] = []
        self._next = itertools.count()
        self._seq = itertools.count()
        self._prefix = secrets.token_hex(4) + "-"
        self._stopping = False
        self._lock = threading.Lock()

    # -- Source -------------------------------------------------------------------------------
    def default_name(self) -> str:
        return "http" + (re.sub(r"[^A-Za-z0-9_]+", "_", self.path).rstrip("_") or "")

    def describe(self) -> str:
        where = f"{self.host or '127.0.0.1'}:{self.port if self.port is not None else 8080}"
        return f"http.endpoint({self.path!r}, {where}{', answers' if self.responds else ''})"

    def spec_trigger(self) -> dict[str, Any]:
        """What `streamfn export` writes for this trigger (without starting it; never the token)."""
        port = self.port or 8080  # port 0 (a free port, for tests) means nothing in a deployment
        scheme = "https" if self.tls_cert else "http"
        return {"kind": "http", "path": self.path, "port": port, "method": ",".join(self.methods or ["*"]),
                "url": f"{scheme}://{servers._url_host(self.host or '127.0.0.1')}:{port}{self.path}"}

    @property
    def url(self) -> str:
        """The endpoint's URL once the run has started (its real port when port=0)."""
        if self._server is None:
            raise ConfigError("the HTTP endpoint has not started yet")
        host = servers._url_host(self._server.host)
        path = self.path[:-2] or "/" if self.path.endswith("/*") else self.path
        return f"{self._server.scheme}://{host}:{self._server.port}{path}"

    def start(self, ctx: "RunContext") -> None:
        self._ctx = ctx
        self._stopping = False
        with self._lock:
            self._lanes, self._order = {}, []
        host = self.host or ctx.setting("http.host") or "127.0.0.1"
        port_setting = ctx.setting("http.port") or "8080"
        if self.port is None and not port_setting.isdigit():
            raise ConfigError(f"the http.port setting must be a port number, got {port_setting!r}")
        port = self.port if self.port is not None else int(port_setting)
        if ctx.until_idle and self.max_requests is None:
            log.warning("an HTTP trigger has no end: --until-idle does not apply to it; it serves "
                        "until stopped (or pass max_requests=N)", extra={"source": self.name})
        guard, tls = self._security(ctx, host)
        self._server = servers.acquire(host, port, tls)
        try:
            self._server.add_route(self.path, self._endpoint, self.methods, self._ready, guard)
        except Exception:
            servers.release(self._server)
            self._server = None
            raise
        log.info("serving", extra={"source": self.name, "url": self.url,
                                   "mode": "answers" if self.responds else "202 accepted"})

    def _security(self, ctx: "RunContext", host: str) -> tuple[servers.Guard | None, tuple[str, str] | None]:
        """The endpoint's token check and rate limit, and the server's TLS files (options, else settings)."""
        auth = self.token or ctx.setting("http.token")
        cert, key = self.tls_cert or ctx.setting("http.tls_cert"), self.tls_key or ctx.setting("http.tls_key")
        if bool(cert) != bool(key):
            raise ConfigError("TLS needs both tls_cert and tls_key (or the settings http.tls_cert, http.tls_key)")
        rate = security.parse_rate(self.rate_limit if self.rate_limit is not None else ctx.setting("http.rate_limit"))
        token = security.TokenCheck(resolve_secret(auth, f"the endpoint {self.path}")) if auth else None
        limit = security.RateLimit(rate) if rate is not None else None
        if token is None and not security.is_loopback(host):
            log.warning("an HTTP endpoint listens beyond loopback without a token check; set token= "
                        "(or --set http.token=env:NAME) unless something in front authenticates",
                        extra={"source": self.name, "host": host})
        if token is None and limit is None:
            return None, (cert, key) if cert and key else None

        def guard(request: servers.Request) -> Answer | None:
            # the rate limit first: a flood of wrong tokens is limited too
            return (limit.check() if limit else None) or (token.check(request.header) if token else None)

        return guard, (cert, key) if cert and key else None

    def partitions(self) -> Sequence[str]:
        return [str(i) for i in range(self.n_lanes)]

    def open(self, partition: str, resume: Position) -> SourcePartition:
        lane = HttpLane(self, partition, resume)
        with self._lock:
            self._lanes[partition] = lane
            self._order = list(self._lanes.values())
        return lane

    def exhausted(self) -> bool:
        return self._stopping or self.finished_accepting()

    def finished_accepting(self) -> bool:
        """True once max_requests requests were accepted, or (stop_with_input) the run's other
        sources have ended: the trigger then ends."""
        if self.stop_with_input and self._ctx is not None and self._ctx.others_done(self):
            return True
        return self.max_requests is not None and sum(lane.accepted for lane in self._order) >= self.max_requests

    def stop(self) -> None:
        self._stopping = True
        server, self._server = self._server, None
        if server is not None:
            server.remove_route(self._endpoint, self._ready)
            servers.release(server)

    # -- answering ----------------------------------------------------------------------------
    def deliver(self, answers: list[tuple["asyncio.Future[Answer] | None", Answer]]) -> None:
        """Complete waiting requests from a lane's thread (one hop to the event loop per batch)."""
        answers = [(w, a) for w, a in answers if w is not None]
        if not answers or self._server is None or self._server.loop is None:
            return
        try:
            self._server.loop.call_soon_threadsafe(_complete, answers)
        except RuntimeError:  # the loop has closed: nobody waits any more
            pass

    def dead_letter_unprocessed(self, partition: str, requests: list[Request]) -> None:
        """Requests answered 202 that the run stopped before processing go to the dead letters."""
        if self._ctx is None:
            return
        letters = [DeadLetter("http", self.name, partition, r.id, "the run stopped before this accepted "
                              "request was processed", r.payload()) for r in requests]
        log.warning("accepted requests not processed before the run stopped; see the dead letters",
                    extra={"source": self.name, "partition": partition, "count": len(letters)})
        self._ctx.dead_letters(letters)

    def _ready(self) -> bool:
        return bool(self._order) and not self._stopping and not (self._ctx and self._ctx.stopping)

    # -- the request handler (event loop thread) ----------------------------------------------
    async def _endpoint(self, request: servers.Request) -> Answer:
        lane = self._pick_lane()
        if lane is None:
            return error_answer(503, "the pipeline is not running")
        seq = next(self._seq)
        request_id = f"{self._prefix}{seq}"
        try:
            body = await _read_body(request, self.max_body_bytes)
        except BodyTooLarge:
            return error_answer(413, f"the body is over the limit of {self.max_body_bytes} bytes", request_id)
        try:
            item = await self._decode(request, body, seq, request_id)
        except codec.BodyError as exc:
            lane.reject(Reject(request_id, body[:_MAX_DEAD_LETTER_PAYLOAD], exc.reason))
            self._wake(lane)
            return error_answer(exc.status, exc.reason, request_id)
        if tracing_active():
            item.trace = extract_context(request.headers)
        if self.responds:
            item.waiter = asyncio.get_running_loop().create_future()
        first = lane.offer(item)
        if first is None:
            status, body, content_type, _ = error_answer(503, "too many requests are waiting; retry later",
                                                         request_id)
            return status, body, content_type, {"retry-after": "1"}
        if not lane.kicking:
            lane.kicking = True
            asyncio.get_running_loop().call_later(self.max_wait_s if first else 0, self._kick, lane)
        if item.waiter is None:
            body = json.dumps({"id": request_id, "rows": item.n_rows}).encode()
            return 202, body, "application/json", {}
        try:
            answer = await asyncio.wait_for(item.waiter, self.timeout_s)
        except TimeoutError:
            answer = error_answer(504, f"no answer within {self.timeout_s:g}s", request_id)
        return answer

    def _pick_lane(self) -> HttpLane | None:
        if self._stopping or not self._order or self.finished_accepting():
            return None
        order = self._order
        return order[next(self._next) % len(order)]

    async def _decode(self, request: servers.Request, body: bytes, seq: int, request_id: str) -> Request:
        content_type = request.header(b"content-type")
        if self.events:
            row = self._event_row(request, body, content_type, request_id)
            return Request(seq, request_id, codec.JSON, True, None, [row], time.monotonic())
        kind = codec.body_kind(content_type)
        single = kind == codec.JSON and body.lstrip()[:1] == b"{"
        if kind == codec.JSON and self.schema is None and len(body) <= _BIG_BODY:
            # the frame is built once per micro-batch from every request's rows (cheaper)
            return Request(seq, request_id, kind, single, None, codec.decode_rows(body), time.monotonic())
        if len(body) > _BIG_BODY:
            frame = await asyncio.to_thread(_decode_body, body, kind, self.schema)
        else:
            frame = _decode_body(body, kind, self.schema)
        return Request(seq, request_id, kind, single, frame, None, time.monotonic())

    def _event_row(self, request: servers.Request, body: bytes, content_type: str | None,
                   request_id: str) -> dict[str, Any]:
        # a dict, not a frame: the micro-batch builds one frame for all its requests (cheaper)
        return {"id": request_id, "method": request.method, "path": request.path, "query": request.query,
                "content_type": content_type or "", "headers": json.dumps(request.headers), "body": body,
                "timestamp": datetime.now(timezone.utc)}

    def _kick(self, lane: HttpLane) -> None:
        # one timer per lane (event loop thread only): wake the lane when its requests are due;
        # a lane busy with a batch cannot be woken, so look again shortly until it took them
        server = self._server
        wait_s = lane.due_in()
        if wait_s is None or lane.closed or server is None or server.loop is None:
            lane.kicking = False
            return
        if wait_s <= 0:
            self._wake(lane)
        server.loop.call_later(max(wait_s, 0.002), self._kick, lane)

    def _wake(self, lane: HttpLane) -> None:
        if self._ctx is not None:
            self._ctx.wake(self, lane.partition)


def _decode_body(body: bytes, kind: str, schema: codec.Schema | None) -> pl.DataFrame:
    if kind == codec.JSON:
        return codec.rows_frame(codec.decode_rows(body), schema)
    return codec.conform(codec.decode_frame(body, kind), schema)


async def _read_body(request: servers.Request, limit: int) -> bytes:
    declared = request.header(b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge()
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.chunks():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge()
        chunks.append(chunk)
    return b"".join(chunks)


def _complete(answers: list[tuple["asyncio.Future[Answer]", Answer]]) -> None:
    for waiter, answer in answers:
        if not waiter.done():
            waiter.set_result(answer)
