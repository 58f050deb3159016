"""The contracts between the runtime and its sources, sinks and state stores.

Core defines them; `streamfn.connectors` and `streamfn.stateful` implement them.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import polars as pl
import pyarrow as pa

from streamfn.batch import Batch, Position

if TYPE_CHECKING:
    from streamfn.runtime import RunContext


@dataclass(frozen=True, slots=True)
class Reject:
    """A record a source could not turn into a row (it goes to the dead letters)."""

    offset: Position
    payload: bytes | str
    error: str


class SourcePartition(ABC):
    """One partition, read in order."""

    @abstractmethod
    def next_batch(self, max_rows: int) -> pa.Table | pl.DataFrame | None:
        """Return new rows, or None if nothing is ready; raise EndOfInput at the end."""

    @abstractmethod
    def position(self) -> Position:
        """Return where the next read starts (saved at checkpoint)."""

    def take_rejects(self) -> list[Reject]:
        """Return (and forget) the records the last reads could not parse."""
        return []

    def commit(self, position: Position) -> None:
        """Called once every row before `position` is durable downstream."""

    def dead_lettered(self, letters: list[Any]) -> None:
        """Told which rows of its last batch made a stage raise (DeadLetters); e.g. to answer a request."""

    def close(self) -> None:
        """Release clients; safe to call twice."""


class Source(ABC):
    """A partitioned input; one lane per partition."""

    def start(self, ctx: "RunContext") -> None:
        """Called once before the run; a source with dynamic partitions keeps ctx."""

    @abstractmethod
    def partitions(self) -> Sequence[str]:
        """List the partitions this worker reads from the start of the run."""

    @abstractmethod
    def open(self, partition: str, resume: Position) -> SourcePartition:
        """Open a partition at its resume position."""

    def exhausted(self) -> bool:
        """True once this source will open no more partitions (asked when none is open)."""
        return True

    #: True when a transactional sink can commit this source's offsets (see Sink.transactional)
    offsets_in_transactions = False

    def committed_position(self, partition: str) -> Position:
        """The position last committed for a partition (None: none), when offsets_in_transactions."""
        return None

    def stop(self) -> None:
        """Called once after the run; release shared clients."""

    def describe(self) -> str:
        """A short text for logs and `streamfn graph`."""
        return type(self).__name__


class Sink(ABC):
    """An output that takes part in checkpoints."""

    #: True when a lane's writer commits the source's offsets with its output, in `commit` (Kafka
    #: transactions): a restarted lane then restores the checkpoint at the source's committed
    #: offset, the one whose output was committed, not a later one whose transaction was not
    transactional = False

    def start(self, ctx: "RunContext") -> None:
        """Called once before the run."""

    def for_lane(self, lane: str) -> "Sink":
        """The writer one lane uses; lanes run on threads, so a shared sink must lock."""
        return self

    def replayed_until(self) -> Position:
        """The last source offset this lane's writer already committed (None: unknown).

        A restarted lane cuts its batches there, so a sink that drops replayed rows by
        offset never sees a batch straddling it (exactly-once table sinks use this).
        """
        return None

    @abstractmethod
    def write(self, batch: Batch) -> None:
        """Accept a batch; it may be buffered until flush."""

    @abstractmethod
    def flush(self, checkpoint_id: str) -> None:
        """Make all writes durable before offsets commit."""

    def commit(self, checkpoint_id: str, position: Position) -> None:
        """The checkpoint holding the flushed writes is saved, at source `position`: a transactional
        sink commits here (with the source's offsets); a repartition writer confirms the rows."""

    def close(self) -> None:
        """Release resources."""

    def describe(self) -> str:
        """A short text for logs and `streamfn graph`."""
        return type(self).__name__


class StateStore(ABC):
    """Keyed state of one stage in one lane."""

    @abstractmethod
    def get_many(self, keys: pa.Array) -> pa.Table:
        """Rows for these keys (null rows where a key is absent), in key order."""

    @abstractmethod
    def put_many(self, table: pa.Table) -> None:
        """Upsert rows by key."""

    @abstractmethod
    def snapshot(self, checkpoint_id: str) -> str:
        """Write the store under the checkpoint; return where it went."""

    @abstractmethod
    def restore(self, url: str) -> None:
        """Replace the contents with a snapshot."""


class StageRunner(ABC):
    """Runs one stage in one lane: the runtime calls it in order, one batch at a time."""

    @abstractmethod
    def process(self, frame: pl.DataFrame, batch: Batch) -> pl.DataFrame | None:
        """Return the stage's output for these rows (None: nothing to emit)."""

    def finish(self) -> pl.DataFrame | None:
        """The input has ended: emit what is still held (e.g. open windows)."""
        return None

    def snapshot(self, checkpoint_id: str) -> dict[str, Any] | None:
        """Save state for a checkpoint; return what the manifest records (None: stateless)."""
        return None

    def restore(self, saved: dict[str, Any]) -> None:
        """Load state that `snapshot` saved."""
