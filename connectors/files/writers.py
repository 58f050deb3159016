"""Writing batches to files that readers only ever see whole.

Each lane writes to a temporary file next to the final one (a hidden name that does
not end in the format's extension); `flush` closes it and renames it to its final
name, so a reader globbing `*.parquet` never sees a half-written file.
"""
from __future__ import annotations

import hashlib
import itertools
import logging
import posixpath
import threading
import uuid
from typing import IO, Any, Callable
from urllib.parse import quote

import fsspec
import polars as pl
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from streamfn.batch import Batch
from streamfn.contracts import Sink
from streamfn.errors import ConfigError

log = logging.getLogger("streamfn.files")


class FormatWriter:
    """Appends frames to one open file in one format."""

    def __init__(self, fmt: str, stream: IO[bytes], options: dict[str, Any]) -> None:
        self.fmt, self.stream, self.options = fmt, stream, options
        self.rows = 0
        self.columns: list[str] | None = None  # fixed by the first frame
        self._arrow: Any = None  # pq.ParquetWriter or an IPC writer, opened with the first batch
        self._schema: pa.Schema | None = None

    def append(self, frame: pl.DataFrame) -> None:
        if self.fmt in ("parquet", "arrow"):
            table = frame.to_arrow()
            if self._arrow is None:
                self._schema = table.schema
                self._arrow = (pq.ParquetWriter(self.stream, table.schema,
                                                compression=self.options.get("compression", "zstd"))
                               if self.fmt == "parquet" else ipc.new_file(self.stream, table.schema))
            elif table.schema != self._schema:
                table = table.cast(self._schema)  # same columns, other types: cast or fail
            self._arrow.write_table(table) if self.fmt == "parquet" else self._arrow.write(table)
        elif self.fmt == "ndjson":
            frame.write_ndjson(self.stream)
        else:
            frame.write_csv(self.stream, include_header=self.rows == 0,
                            separator=self.options.get("separator", ","))
        self.rows += frame.height
        self.columns = self.columns or frame.columns

    def schema_differs(self, frame: pl.DataFrame) -> bool:
        """True when the frame's columns differ from the open file's (it needs a new file)."""
        return self.columns is not None and self.columns != frame.columns

    def close(self) -> None:
        if self._arrow is not None:
            self._arrow.close()
        self.stream.close()


class LaneFileWriter(Sink):
    """One lane's files under the sink's directory; published at flush."""

    def __init__(self, fs: fsspec.AbstractFileSystem, directory: str, fmt: str, ext: str, lane: str,
                 run_tag: str, options: dict[str, Any], max_rows_per_file: int) -> None:
        self.fs, self.directory, self.fmt, self.ext = fs, directory, fmt, ext
        self.options = options
        self.max_rows_per_file = max_rows_per_file
        # a lane reopened in the same run (a Kafka rebalance) gets a new writer: never reuse its names
        self._prefix = f"part-{run_tag}-{hashlib.sha1(lane.encode()).hexdigest()[:8]}-{uuid.uuid4().hex[:6]}"
        self._seq = itertools.count()
        self._open: tuple[FormatWriter, str] | None = None
        self._closed_files: list[str] = []  # temporary names waiting to be published

    def _temp_name(self) -> str:
        return posixpath.join(self.directory, f".{self._prefix}-{uuid.uuid4().hex[:12]}.{self.ext}.tmp")

    def write(self, batch: Batch) -> None:
        frame = batch.frame
        if frame.height == 0:
            return
        if self._open is not None and self._open[0].schema_differs(frame):
            self._roll()
        if self._open is None:
            temp = self._temp_name()
            self._open = (FormatWriter(self.fmt, self.fs.open(temp, "wb"), self.options), temp)
        self._open[0].append(frame)
        if self._open[0].rows >= self.max_rows_per_file:
            self._roll()

    def _roll(self) -> None:
        if self._open is not None:
            writer, temp = self._open
            self._open = None
            writer.close()
            self._closed_files.append(temp)

    def flush(self, checkpoint_id: str) -> None:
        self._roll()
        for temp in self._closed_files:
            final = posixpath.join(self.directory, f"{self._prefix}-{next(self._seq):06d}.{self.ext}")
            self.fs.mv(temp, final)
            log.debug("file published", extra={"file": final, "checkpoint": checkpoint_id})
        self._closed_files.clear()

    def close(self) -> None:
        """Drop what was never flushed: its offsets were not committed either."""
        if self._open is not None:
            self._open[0].close()
            self._closed_files.append(self._open[1])
            self._open = None
        for temp in self._closed_files:
            self.fs.rm(temp)
        self._closed_files.clear()


HIVE_NULL = "__HIVE_DEFAULT_PARTITION__"  # the folder name Hive, Spark, pyarrow and polars read as null


def hive_folder(columns: list[str], values: tuple[Any, ...]) -> str:
    """The Hive folder of one partition: `col=value/...`, values percent-encoded, null as Hive's default."""
    return "/".join(f"{quote(str(c), safe='')}={HIVE_NULL if v is None else quote(str(v), safe='')}"
                    for c, v in zip(columns, values))


class PartitionedLaneWriter(Sink):
    """One lane's files in Hive folders (`date=2026-03-02/symbol=AAPL/`), one file writer per folder.

    The partition columns become folder names and are left out of the files, as Hive does;
    every folder's files are published when the lane commits, each one whole.
    """

    def __init__(self, by: list[str], make: Callable[[str], LaneFileWriter]) -> None:
        self.by, self._make = by, make
        self._writers: dict[str, LaneFileWriter] = {}

    def write(self, batch: Batch) -> None:
        frame = batch.frame
        if frame.height == 0:
            return
        missing = [c for c in self.by if c not in frame.columns]
        if missing or len(self.by) == frame.width:
            raise ConfigError(f"partition_by={self.by}: the rows need these column(s) and at least one "
                              f"more to write; they have {frame.columns}")
        for values, part in frame.partition_by(self.by, as_dict=True, maintain_order=True).items():
            folder = hive_folder(self.by, values)
            writer = self._writers.get(folder)
            if writer is None:
                writer = self._writers[folder] = self._make(folder)
            writer.write(batch.with_frame(part.drop(self.by)))

    def flush(self, checkpoint_id: str) -> None:
        for writer in self._writers.values():
            writer.flush(checkpoint_id)

    def close(self) -> None:
        """Drop every folder's unflushed file."""
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()


class SharedWriters:
    """Lane writers behind a lock, for a caller that writes to the sink itself."""

    def __init__(self, make: Callable[[str], Sink]) -> None:
        self._make = make
        self._lock = threading.Lock()
        self._writer: Sink | None = None

    def write(self, batch: Batch) -> None:
        with self._lock:
            if self._writer is None:
                self._writer = self._make("shared")
            self._writer.write(batch)

    def flush(self, checkpoint_id: str) -> None:
        with self._lock:
            if self._writer is not None:
                self._writer.flush(checkpoint_id)

    def close(self) -> None:
        with self._lock:
            if self._writer is not None:
                self._writer.close()
                self._writer = None


