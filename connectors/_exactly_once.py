"""Exactly-once bookkeeping shared by the table sinks (PostgreSQL, Delta Lake, Iceberg).

Each (pipeline, lane) commits its rows together with the highest source offset they came
from (and the checkpoint id) in one transaction of the target. After a crash the source
re-reads from its last committed offset, which can be behind what the target already holds;
`ReplayFilter` drops the rows at or below the recorded offset, so nothing lands twice.
This is a helper for the table connectors, not a connector itself.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import polars as pl
import pyarrow as pa

from streamfn.batch import Batch
from streamfn.errors import StreamfnError

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
