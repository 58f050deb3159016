"""In-memory source and sink, for tests and notebooks."""
from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any

import polars as pl
import pyarrow as pa

from streamfn.batch import Batch, Position, as_frame
from streamfn.contracts import Sink, Source, SourcePartition
from streamfn.errors import ConfigError, EndOfInput

Data = pl.DataFrame | pa.Table | Sequence[dict[str, Any]] | Sequence[pl.DataFrame | pa.Table]


def _to_batches(data: Any, batch_rows: int | None) -> list[pl.DataFrame]:
    if isinstance(data, (pl.DataFrame, pa.Table, pa.RecordBatch, pl.LazyFrame)):
        frames = [as_frame(data)]
    elif isinstance(data, Sequence) and not isinstance(data, (str, bytes)):
        if all(isinstance(d, dict) for d in data):
            frames = [pl.DataFrame(list(data))] if data else []
        else:
            frames = [as_frame(d) for d in data]
    else:
        raise ConfigError("memory.source takes a DataFrame, a pyarrow Table, a list of dicts or a "
                          f"list of frames, got {type(data).__name__}")
    if batch_rows is None:
        return frames
    return [f.slice(i, batch_rows) for f in frames for i in range(0, f.height, batch_rows)]


class _MemoryPartition(SourcePartition):
    def __init__(self, batches: list[pl.DataFrame], resume: Position) -> None:
        self._batches = batches
        self._starts = [0]
        for frame in batches:
            self._starts.append(self._starts[-1] + frame.height)
        self._row = int(resume or 0)  # position = rows already read

    def next_batch(self, max_rows: int) -> pl.DataFrame | None:
        for i, frame in enumerate(self._batches):
            start, end = self._starts[i], self._starts[i + 1]
            if start <= self._row < end:
                offset = self._row - start
                rows = frame.slice(offset, max_rows)
                self._row += rows.height
                return rows
        raise EndOfInput()

    def position(self) -> Position:
        return self._row


class MemorySource(Source):
    """Rows from memory; each item of a list is one batch, each key of a dict one partition."""

    def __init__(self, data: Data | Mapping[str, Data], *, name: str = "memory",
                 batch_rows: int | None = None) -> None:
        if isinstance(data, Mapping):
            self._partitions = {str(k): _to_batches(v, batch_rows) for k, v in data.items()}
        else:
            self._partitions = {"0": _to_batches(data, batch_rows)}
        self._name = name

    def default_name(self) -> str:
        return self._name

    def partitions(self) -> list[str]:
        return list(self._partitions)

    def open(self, partition: str, resume: Position) -> SourcePartition:
        return _MemoryPartition(self._partitions[partition], resume)

    def describe(self) -> str:
        rows = sum(f.height for batches in self._partitions.values() for f in batches)
        return f"memory.source({rows} rows, {len(self._partitions)} partitions)"


class MemorySink(Sink):
    """Collects every batch; `frame()` gives them as one DataFrame."""

    def __init__(self, *, name: str = "memory_sink") -> None:
        self._name = name
        self._lock = threading.Lock()
        self._pending: dict[str, list[Batch]] = {}
        self._batches: list[Batch] = []

    def default_name(self) -> str:
        return self._name

    def write(self, batch: Batch) -> None:
        with self._lock:
            self._pending.setdefault(batch.partition, []).append(batch)

    def flush(self, checkpoint_id: str) -> None:
        with self._lock:
            for batches in self._pending.values():
                self._batches.extend(batches)
            self._pending.clear()

    def batches(self) -> list[Batch]:
        """The batches flushed so far, in the order they were flushed."""
        with self._lock:
            return list(self._batches)

    def frame(self) -> pl.DataFrame:
        """Every flushed row as one DataFrame (empty when nothing came)."""
        batches = self.batches()
        if not batches:
            return pl.DataFrame()
        return pl.concat([b.frame for b in batches], how="diagonal_relaxed")

    def describe(self) -> str:
        return "memory.sink()"


def source(data: Data | Mapping[str, Data], *, name: str = "memory",
           batch_rows: int | None = None) -> MemorySource:
    """A source over in-memory rows: a frame, a list of dicts, a list of frames (one batch
    each) or a dict of partition name -> any of those."""
    return MemorySource(data, name=name, batch_rows=batch_rows)


def sink(*, name: str = "memory_sink") -> MemorySink:
    """A sink that keeps what it is given; read it with `.frame()`."""
    return MemorySink(name=name)
