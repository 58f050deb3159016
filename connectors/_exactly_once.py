"""Exactly-once bookkeeping shared by the table sinks (PostgreSQL, Delta Lake, Iceberg).

Each (pipeline, lane) commits its rows together with the highest source offset they came
from (and the checkpoint id) in one transaction of the target. After a crash the source
re-reads from its last committed offset, which can be behind what the target already holds;
`ReplayFilter` drops the rows at or below the recorded offset, so nothing lands twice.
This is a helper for the table connectors, not a connector itself; it also holds what
they share beyond it (Arrow type fitting, last-row-per-key, a bounded record-batch source).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar

import polars as pl
import pyarrow as pa

from streamfn.batch import Batch, Position
from streamfn.contracts import Sink, SourcePartition
from streamfn.errors import EndOfInput, StreamfnError

log = logging.getLogger("streamfn.tables")

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Progress:
    """What a target holds for one (pipeline, lane): the last checkpoint and source offset."""

    checkpoint_id: str | None = None
    high_offset: int | None = None


class ReplayFilter:
    """Drops rows that a previous run of the same lane already committed."""

    def __init__(self, committed: Progress, lane: str, *, idempotent: bool) -> None:
        self.committed = committed
        self.lane = lane
        self.idempotent = idempotent  # upsert/merge: a repeated row overwrites itself
        self.dropped_rows = 0

    def admit(self, batch: Batch) -> pl.DataFrame | None:
        """The rows of this batch that the target does not hold yet (None: none)."""
        high = self.committed.high_offset
        first, last = batch.first_offset, batch.last_offset
        if high is None or not isinstance(first, int) or not isinstance(last, int):
            return batch.frame
        if last <= high:
            self.dropped_rows += batch.num_rows
            log.debug("replayed batch dropped", extra={"lane": self.lane, "offset": last, "committed": high})
            return None
        if first > high or self.idempotent:
            return batch.frame
        # The batch straddles the committed offset: cut it when its rows map 1:1 to offsets.
        if batch.num_rows == last - first + 1:
            skip = high - first + 1
            self.dropped_rows += skip
            return batch.frame.slice(skip)
        log.warning("a replayed batch straddles the committed offset and its rows do not map to "
                    "offsets; writing all of them (some may repeat)",
                    extra={"lane": self.lane, "first_offset": first, "offset": last, "committed": high})
        return batch.frame


@dataclass
class Pending:
    """Rows buffered for the next commit, with the source offsets they span."""

    tables: list[pa.Table] = field(default_factory=list)
    rows: int = 0
    first_offset: int | None = None
    high_offset: int | None = None
    offsets_known: bool = True

    def add(self, table: pa.Table, batch: Batch) -> None:
        """Buffer one batch's rows (already filtered)."""
        self.tables.append(table)
        self.rows += table.num_rows
        first, last = batch.first_offset, batch.last_offset
        if isinstance(first, int) and isinstance(last, int):
            self.first_offset = first if self.first_offset is None else min(self.first_offset, first)
            self.high_offset = last if self.high_offset is None else max(self.high_offset, last)
        else:
            self.offsets_known = False

    def table(self) -> pa.Table:
        """Every buffered row as one table."""
        return pa.concat_tables(self.tables, promote_options="permissive") if len(self.tables) > 1 \
            else self.tables[0]

    def progress(self, checkpoint_id: str | None, before: Progress) -> Progress:
        """What the target will hold once these rows commit."""
        high = self.high_offset if self.offsets_known else None
        if high is None:
            high = before.high_offset
        elif before.high_offset is not None:
            high = max(high, before.high_offset)
        return Progress(checkpoint_id or before.checkpoint_id, high)


def already_committed(checkpoint_id: str, committed: Progress) -> bool:
    """True when this checkpoint id (or a later one) is already recorded for the lane."""
    return committed.checkpoint_id is not None and checkpoint_id <= committed.checkpoint_id


class LaneWriter(Sink):
    """One lane's writer into a table: drops replayed rows, buffers, commits once per checkpoint.

    A target supplies `_retry` (its retryable errors), `_load` (what it holds for the lane),
    `_store` (the pending rows and their progress in one target transaction) and may change
    `_rows` (a frame as the Arrow table it stores), `_buffered` and `_discard`.
    """

    def __init__(self, lane: str, *, idempotent: bool, max_buffer_rows: int) -> None:
        self.lane = lane
        self._idempotent = idempotent  # upsert/merge: a repeated row overwrites itself
        self._max_buffer_rows = max_buffer_rows
        self._filter: ReplayFilter | None = None
        self._committed = Progress()
        self._pending = Pending()

    def _retry(self, action: Callable[[], T]) -> T:
        """Run action with the target's bounded retries."""
        raise NotImplementedError

    def _load(self) -> Progress:
        """What the target holds for this lane (read once, before the first write)."""
        raise NotImplementedError

    def _store(self, pending: Pending, progress: Progress, checkpoint_id: str | None) -> None:
        """Write the pending rows and the lane's progress in one transaction of the target."""
        raise NotImplementedError

    def _rows(self, frame: pl.DataFrame) -> pa.Table:
        """The admitted rows of a batch as the Arrow table the target stores."""
        return plain_arrow(frame.to_arrow())

    def _buffered(self, rows: pa.Table) -> None:
        """Called after a batch's rows were buffered (a target may send them early)."""

    def _discard(self) -> None:
        """Called when the pending rows' checkpoint is already in the target."""

    def _replay_filter(self) -> ReplayFilter:
        if self._filter is None:
            self._committed = self._retry(self._load)
            self._filter = ReplayFilter(self._committed, self.lane, idempotent=self._idempotent)
        return self._filter

    def replayed_until(self) -> Position:
        return self._replay_filter().committed.high_offset

    def write(self, batch: Batch) -> None:
        frame = self._replay_filter().admit(batch)
        if frame is None or frame.height == 0:
            return
        rows = self._rows(frame)
        self._pending.add(rows, batch)  # kept until committed: a retry writes it again
        self._buffered(rows)
        if self._pending.rows >= self._max_buffer_rows:
            self._commit(None)  # bounded memory: the offsets recorded keep this exactly once

    def flush(self, checkpoint_id: str) -> None:
        self._replay_filter()
        if already_committed(checkpoint_id, self._committed):
            log.info("checkpoint already committed; skipped", extra={"lane": self.lane,
                                                                     "checkpoint": checkpoint_id})
            self._discard()
            self._pending = Pending()
            return
        if self._pending.rows:
            self._commit(checkpoint_id)

    def _commit(self, checkpoint_id: str | None) -> None:
        pending = self._pending
        progress = pending.progress(checkpoint_id, self._committed)
        self._store(pending, progress, checkpoint_id)
        self._committed = progress
        self._pending = Pending()
        log.debug("rows committed", extra={"lane": self.lane, "rows": pending.rows,
                                           "checkpoint": checkpoint_id, "offset": progress.high_offset})


def with_retries(action: Callable[[], T], *, what: str, retryable: tuple[type[BaseException], ...],
                 retries: int, backoff_s: float, on_retry: Callable[[], None] | None = None) -> T:
    """Run action, retrying a bounded number of times on connection-type errors."""
    delay = backoff_s
    for attempt in range(retries + 1):
        try:
            return action()
        except retryable as exc:
            if attempt == retries:
                raise TargetUnavailable(f"{what} failed after {retries + 1} attempts: "
                                        f"{type(exc).__name__}: {_one_line(exc)}; the source offsets were "
                                        "not committed, so a restart writes these rows again") from exc
            log.warning("target unavailable; retrying", extra={"target": what, "attempt": attempt + 1,
                                                               "retry_in_s": delay,
                                                               "error": type(exc).__name__})
            time.sleep(delay)  # why: the target is down; waiting is the point of a retry
            delay = min(delay * 2, 10.0)
            if on_retry is not None:
                on_retry()
    raise AssertionError("unreachable")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else ""


class TargetUnavailable(StreamfnError):
    """A table target stayed unreachable through every retry."""


class SchemaMismatch(StreamfnError):
    """A batch's columns do not fit the target table."""


def describe_schema(schema: pa.Schema) -> str:
    """`name type, ...` for error messages."""
    return ", ".join(f"{f.name} {f.type}" for f in schema)


def plain_arrow(table: pa.Table) -> pa.Table:
    """Replace view types (polars' string_view etc.) by the plain Arrow types writers accept."""
    fields = [pa.field(f.name, _plain_type(f.type), f.nullable) for f in table.schema]
    target = pa.schema(fields)
    return table if target.equals(table.schema) else table.cast(target)


def _plain_type(t: pa.DataType) -> pa.DataType:
    if t == pa.string_view():
        return pa.large_string()
    if t == pa.binary_view():
        return pa.large_binary()
    if pa.types.is_list_view(t) or pa.types.is_large_list_view(t) or pa.types.is_list(t) \
            or pa.types.is_large_list(t):
        return pa.large_list(_plain_type(t.value_type))
    if pa.types.is_struct(t):
        return pa.struct([pa.field(f.name, _plain_type(f.type), f.nullable) for f in t])
    return t


def micros_utc(table: pa.Table) -> pa.Table:
    """Timestamps in microseconds (UTC when zoned) and no view types: what Delta and Iceberg store."""
    table = plain_arrow(table)
    fields = []
    for f in table.schema:
        t = f.type
        if pa.types.is_timestamp(t) and (t.unit != "us" or (t.tz and t.tz != "UTC")):
            t = pa.timestamp("us", "UTC" if t.tz else None)
        fields.append(pa.field(f.name, t, f.nullable))
    target = pa.schema(fields)
    return table if target.equals(table.schema) else table.cast(target)


def last_per_key(rows: pa.Table, key: list[str]) -> pa.Table:
    """One row per key, the last one (as a replay would leave it), in arrival order."""
    frame = pl.from_arrow(rows)
    assert isinstance(frame, pl.DataFrame)
    return frame.unique(subset=key, keep="last", maintain_order=True).to_arrow().cast(rows.schema)


class BatchesPartition(SourcePartition):
    """A bounded source partition over record batches; position = rows already returned."""

    def __init__(self, batches: Iterable[pa.RecordBatch], resume: Position, *,
                 convert: Callable[[pa.Table], pa.Table] | None = None,
                 on_close: Callable[[], None] | None = None) -> None:
        self._batches = iter(batches)
        self._convert, self._on_close = convert, on_close
        self._rest: pa.Table | None = None
        self._rows = 0
        skip = int(resume or 0)
        # a resumed read re-reads the same snapshot (or query) up to where it stopped
        while self._rows < skip and self._take(skip - self._rows) is not None:
            pass

    def _take(self, max_rows: int) -> pa.Table | None:
        while self._rest is None or self._rest.num_rows == 0:
            batch = next(self._batches, None)
            if batch is None:
                return None
            table = pa.Table.from_batches([batch])
            self._rest = table if self._convert is None else self._convert(table)
        out, self._rest = self._rest.slice(0, max_rows), self._rest.slice(max_rows)
        self._rows += out.num_rows
        return out

    def next_batch(self, max_rows: int) -> pa.Table | None:
        out = self._take(max_rows)
        if out is None:
            raise EndOfInput()
        return out

    def position(self) -> Position:
        return self._rows

    def close(self) -> None:
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close()
