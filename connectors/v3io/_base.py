"""What every v3io connector shares: the connection, a client per lane, and bad rows to dead letters."""
from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

import polars as pl

from streamfn.batch import Batch
from streamfn.contracts import Sink
from streamfn.deadletter import DeadLetter, row_payload
from streamfn.connectors.v3io._conn import Connection

if TYPE_CHECKING:
    from streamfn.runtime import RunContext


class V3ioConnector:
    """Holds the connection options; `start` resolves them and checks that framesd answers."""

    backend = ""

    def __init__(self, table: str, conn: Connection) -> None:
        self.table = table
        self.conn = conn
        self.ctx: "RunContext | None" = None
        self._client: Any = None
        self._lock = threading.Lock()

    def start(self, ctx: "RunContext") -> None:
        """Resolve address/container/key and connect once (a clear error now, not mid-stream)."""
        self.ctx = ctx
        self.conn = self.conn.resolve(ctx)
        self._client = self.conn.client()
        self.on_start(self._client)

    def on_start(self, client: Any) -> None:
        """Create the table when asked (subclasses)."""

    def client(self) -> Any:
        """The shared client (started first)."""
        if self._client is None:
            self.conn = self.conn.resolve(self.ctx)
            self._client = self.conn.client()
        return self._client

    def describe(self) -> str:
        return f"v3io.{self.backend}({self.table})"

    def default_name(self) -> str:
        return self.table.strip("/").replace("/", "_") or self.backend


class LaneWriter(Sink):
    """One lane's writer: its own client, so lanes never share an HTTP session."""

    def __init__(self, owner: "V3ioSink") -> None:
        self.owner = owner
        self.client = owner.conn.client()

    def write(self, batch: Batch) -> None:
        self.owner.write_with(self.client, batch)

    def flush(self, checkpoint_id: str) -> None:
        """Writes are made durable by framesd when write() returns."""


class V3ioSink(V3ioConnector, Sink):
    """A sink that writes each batch with one frames write call (at-least-once; kv upserts are idempotent)."""

    def for_lane(self, lane: str) -> Sink:
        return LaneWriter(self)

    def write(self, batch: Batch) -> None:
        with self._lock:
            self.write_with(self.client(), batch)

    def flush(self, checkpoint_id: str) -> None:
        """Nothing is buffered."""

    def write_with(self, client: Any, batch: Batch) -> None:
        """Write one batch with this client (subclasses)."""
        raise NotImplementedError

    def drop_bad(self, batch: Batch, bad: pl.Series, reason: str) -> pl.DataFrame:
        """Send rows where `bad` is true to the dead letters; return the rest."""
        frame = batch.frame
        if not bool(bad.any()):
            return frame
        letters = [DeadLetter(self.describe(), batch.source, batch.partition, batch.first_offset, reason,
                              row_payload(frame.slice(i, 1)), i) for i in bad.arg_true().to_list()]
        if self.ctx is not None:
            self.ctx.dead_letters(letters)
        return frame.filter(~bad)
