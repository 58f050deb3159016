"""One lane of an HTTP endpoint: a bounded queue of requests, micro-batched into frames.

The event loop thread offers decoded requests; the lane's thread takes every request that is
due (the oldest has waited `max_wait_s`, or enough rows are waiting) as one DataFrame. When
the endpoint answers requests (`http.respond`), the rows a stage produced for each request are
collected while the lane runs the batch, and the answers go out when the lane asks for its
next batch, i.e. once every stage and sink of the batch has run.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from streamfn.batch import Position
from streamfn.contracts import Reject, SourcePartition
from streamfn.errors import EndOfInput
from streamfn.observe.tracing import set_batch_contexts, tracing_active

from streamfn.connectors.http import codec

if TYPE_CHECKING:
    import asyncio

    from streamfn.deadletter import DeadLetter

    from streamfn.connectors.http.source import HttpSource

log = logging.getLogger("streamfn.http")

REQUEST_ID = "_request_id"  # Int64: which request a row came from (kept by filter/with_columns)
RAW_COLUMNS = ("_http_status", "_http_body", "_http_content_type", "_http_headers")
Answer = tuple[int, bytes, str, dict[str, str]]  # status, body, content type, headers


@dataclass(slots=True, eq=False)
class Request:
    """One accepted request: its rows and, when it waits for an answer, its future."""

    seq: int
    id: str
    kind: str
    single: bool
    frame: pl.DataFrame | None  # decoded rows, or
    rows: list[dict[str, Any]] | None  # JSON rows, turned into a frame once per micro-batch
    arrived: float
    waiter: "asyncio.Future[Answer] | None" = None
    outputs: list[dict[str, Any]] = field(default_factory=list)
    failed: str | None = None
    trace: Any = None  # the caller's trace context (traceparent), when a run is traced

    @property
    def n_rows(self) -> int:
        """How many rows the request brought."""
        return len(self.rows) if self.rows is not None else self.frame.height if self.frame is not None else 0

    def payload(self) -> str:
        """The request's rows as NDJSON (for a dead letter)."""
        if self.rows is not None:
            return "".join(json.dumps(r, default=str) + "\n" for r in self.rows)
        return self.frame.write_ndjson() if self.frame is not None else ""


def error_answer(status: int, message: str, request_id: str | None = None) -> Answer:
    """A JSON error body: a short reason, never a traceback."""
    body: dict[str, Any] = {"error": message}
    if request_id is not None:
        body["id"] = request_id
    return status, json.dumps(body).encode(), "application/json", {}


class HttpLane(SourcePartition):
    """A partition of an HTTP endpoint; its position counts the rows handed out."""

    def __init__(self, source: "HttpSource", partition: str, resume: Position) -> None:
        self.source = source
        self.partition = partition
        self._lock = threading.Lock()
        self._pending: deque[Request] = deque()
        self._pending_rows = 0
        self._rejects: list[Reject] = []
        self._inflight: dict[int, Request] = {}
        self._outputs: list[pl.DataFrame] = []
        self._rows = int(resume) if isinstance(resume, (int, str)) and str(resume).isdigit() else 0
        self.accepted = 0
        self.closed = False
        self.kicking = False  # a wake-up timer is set (read and written on the event loop only)

    # -- the event loop's side ----------------------------------------------------------------
    def offer(self, request: Request) -> bool | None:
        """Queue a request; True if it is the first waiting, None if the queue is full or closed."""
        with self._lock:
            if self.closed or len(self._pending) >= self.source.max_pending:
                return None
            self._pending.append(request)
            self._pending_rows += request.n_rows
            self.accepted += 1
            return len(self._pending) == 1

    def reject(self, reject: Reject) -> None:
        """Keep a request that could not become rows, for the dead letters."""
        with self._lock:
            self._rejects.append(reject)

    def due_in(self) -> float | None:
        """Seconds until the waiting requests are due (0: now), None when none wait."""
        with self._lock:
            if not self._pending:
                return None
            now = time.monotonic()
            if self._is_due(now):
                return 0.0
            return self.source.max_wait_s - (now - self._pending[0].arrived)

    def _is_due(self, now: float) -> bool:
        return (now - self._pending[0].arrived >= self.source.max_wait_s
                or self._pending_rows >= self.source.max_batch_rows)

    # -- the lane's side ----------------------------------------------------------------------
    def next_batch(self, max_rows: int) -> pl.DataFrame | None:
        self._answer_inflight()
        frame = None
        while frame is None:
            with self._lock:
                if not self._pending:
                    if self.source.finished_accepting():
                        raise EndOfInput()
                    return None
                if not self._is_due(time.monotonic()):
                    return None
                taken = self._take(min(max_rows, self.source.max_batch_rows))
            frame = self._frame(taken)
            if frame is not None and frame.height == 0:  # only empty requests: nothing to run
                self.source.deliver([(r.waiter, _answer(r)) for r in taken if r.waiter is not None])
                frame = None
        self._rows += frame.height
        if tracing_active():  # the batch's span continues the callers' traces
            set_batch_contexts(r.trace for r in taken)
        if self.source.responds:
            self._inflight = {r.seq: r for r in taken}
        return frame

    def _take(self, max_rows: int) -> list[Request]:
        taken = [self._pending.popleft()]
        rows = taken[0].n_rows
        while self._pending and rows + self._pending[0].n_rows <= max_rows:
            request = self._pending.popleft()
            rows += request.n_rows
            taken.append(request)
        self._pending_rows -= rows
        return taken

    def _frame(self, taken: list[Request]) -> pl.DataFrame | None:
        """The requests' rows as one frame; None (and the request rejected) if one cannot be read."""
        try:
            frame = _combine(taken)
        except Exception:  # rows that do not make one table: one request per batch for these
            self._put_back(taken[1:])
            taken[1:] = []
            try:
                frame = _combine(taken)
            except Exception as exc:
                self._reject_alone(taken[0], exc)
                return None
        if not self.source.responds:
            return frame
        counts = [r.n_rows for r in taken]
        ids = np.repeat(np.array([r.seq for r in taken], dtype=np.int64), counts)
        return frame.with_columns(pl.Series(REQUEST_ID, ids, dtype=pl.Int64))

    def _reject_alone(self, request: Request, exc: Exception) -> None:
        reason = f"rows do not make one table: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
        with self._lock:
            self._rejects.append(Reject(request.id, request.payload(), reason))
        if request.waiter is not None:
            self.source.deliver([(request.waiter, error_answer(422, reason, request.id))])

    def _put_back(self, requests: list[Request]) -> None:
        with self._lock:
            self._pending.extendleft(reversed(requests))
            self._pending_rows += sum(r.n_rows for r in requests)

    def position(self) -> Position:
        return self._rows

    def take_rejects(self) -> list[Reject]:
        with self._lock:
            rejects, self._rejects = self._rejects, []
        return rejects

    # -- answers ------------------------------------------------------------------------------
    def collect(self, frame: pl.DataFrame) -> None:
        """Keep rows a respond sink got, to answer their requests once the batch is done."""
        if self._inflight and frame.height:
            self._outputs.append(frame)

    def dead_lettered(self, letters: "list[DeadLetter]") -> None:
        """Mark the requests whose rows made a stage raise: they are answered 500."""
        for letter in letters:
            try:
                seq = json.loads(letter.payload).get(REQUEST_ID)
            except (ValueError, AttributeError, TypeError):
                continue
            request = self._inflight.get(seq) if isinstance(seq, int) else None
            if request is not None and request.failed is None:
                request.failed = f"stage {letter.stage!r} raised {letter.error.split(':', 1)[0]}"

    def _answer_inflight(self) -> None:
        if not self._inflight:
            return
        inflight, self._inflight = self._inflight, {}
        outputs, self._outputs = self._outputs, []
        try:
            self._route(inflight, outputs)
            answers = [(r.waiter, _answer(r)) for r in inflight.values() if r.waiter is not None]
        except Exception:  # a frame we cannot encode: the clients get a 500, the log the cause
            log.exception("could not encode the answers", extra={"source": self.source.name,
                                                                 "partition": self.partition})
            answers = [(r.waiter, error_answer(500, "the answer could not be encoded", r.id))
                       for r in inflight.values() if r.waiter is not None]
        self.source.deliver(answers)

    def _route(self, inflight: dict[int, Request], outputs: list[pl.DataFrame]) -> None:
        for frame in outputs:
            if REQUEST_ID not in frame.columns:
                if len(inflight) == 1:
                    next(iter(inflight.values())).outputs.extend(frame.to_dicts())
                    continue
                log.error("a respond stage's output lost the request id column; keep it "
                          "(select() drops it, with_columns()/filter() keep it)",
                          extra={"source": self.source.name, "partition": self.partition})
                for request in inflight.values():
                    request.failed = request.failed or f"the stage output has no {REQUEST_ID!r} column"
                continue
            for row in frame.to_dicts():
                owner = inflight.get(row.pop(REQUEST_ID))
                if owner is not None:
                    owner.outputs.append(row)

    def commit(self, position: Position) -> None:
        # the lane commits only after its batch went through every stage and sink
        self._answer_inflight()

    def close(self) -> None:
        if self._inflight:  # closed without a commit: the batch failed part way
            failed = [(r.waiter, error_answer(500, "the pipeline failed while processing this request", r.id))
                      for r in self._inflight.values() if r.waiter is not None]
            self._inflight, self._outputs = {}, []
            self.source.deliver(failed)
        with self._lock:
            self.closed = True
            pending, self._pending = list(self._pending), deque()
        self.source.deliver([(r.waiter, error_answer(503, "the pipeline is stopping", r.id))
                             for r in pending if r.waiter is not None])
        accepted = [r for r in pending if r.waiter is None]
        if accepted:  # answered 202 but not yet processed: never dropped silently
            self.source.dead_letter_unprocessed(self.partition, accepted)


def _combine(requests: list[Request]) -> pl.DataFrame:
    """One frame of the requests' rows, in order (JSON rows are built into a frame once, here)."""
    pieces: list[pl.DataFrame] = []
    run: list[dict[str, Any]] = []
    for request in requests:
        if request.rows is not None:
            run.extend(request.rows)
            continue
        if run:
            pieces.append(pl.from_dicts(run, infer_schema_length=None))
            run = []
        if request.frame is not None:
            pieces.append(request.frame)
    if run:
        pieces.append(pl.from_dicts(run, infer_schema_length=None))
    pieces = [p for p in pieces if p.height]
    if not pieces:
        return pl.DataFrame()
    try:
        frame = pl.concat(pieces, how="vertical") if len(pieces) > 1 else pieces[0]
    except Exception:  # columns or types differ between requests
        frame = pl.concat(pieces, how="diagonal_relaxed")
    if frame.height != sum(r.n_rows for r in requests):  # e.g. `{}`: a row without columns
        raise ValueError("a request holds an empty object")
    return frame


def _answer(request: Request) -> Answer:
    if request.failed is not None:
        return error_answer(500, request.failed, request.id)
    rows = request.outputs
    if rows and "_http_body" in rows[0]:  # a handler's answer: its first row
        return _raw_answer(rows[0])
    if request.kind == codec.JSON:
        body, content_type = codec.encode_json(rows, single=request.single), codec.CONTENT_TYPES[codec.JSON]
    else:
        body, content_type = codec.encode(pl.from_dicts(rows, infer_schema_length=None) if rows
                                          else pl.DataFrame(), request.kind, single=False)
    return 200, body, content_type, {"x-request-id": request.id}


def _raw_answer(row: dict[str, Any]) -> Answer:
    headers = json.loads(row["_http_headers"]) if row.get("_http_headers") else {}
    return int(row["_http_status"]), bytes(row["_http_body"] or b""), str(row["_http_content_type"]), headers
