"""A memory source whose partitions fail after some batches: an in-process crash for tests."""
from __future__ import annotations

from streamfn.batch import Position
from streamfn.connectors.memory import MemorySource
from streamfn.contracts import SourcePartition


class Crash(RuntimeError):
    """The planned failure."""


class _Partition(SourcePartition):
    def __init__(self, inner: SourcePartition, fail_after: int | None) -> None:
        self.inner, self.left = inner, fail_after

    def next_batch(self, max_rows: int):
        if self.left is not None:
            if self.left == 0:
                raise Crash("planned crash")
            self.left -= 1
        return self.inner.next_batch(max_rows)

    def position(self) -> Position:
        return self.inner.position()


class CrashingSource(MemorySource):
    """Like memory.source, but each partition raises Crash after `fail_after` batches (None: never)."""

    def __init__(self, data, *, fail_after: int | None, batch_rows: int | None = None) -> None:
        super().__init__(data, batch_rows=batch_rows)
        self.fail_after = fail_after

    def open(self, partition: str, resume: Position) -> SourcePartition:
        return _Partition(super().open(partition, resume), self.fail_after)
