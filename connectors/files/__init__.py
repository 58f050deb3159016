"""Files on any fsspec URL (local paths, file://, memory://, s3://...) as sources and sinks.

    p.source(files.ndjson("data/ticks-*.jsonl", schema={"price": pl.Float64, ...}))
    node.sink(files.parquet("out/vwap/"))

As a source, each file is a partition (read in order; position = records read). As a
sink, the URL is a directory: each lane writes its own part files there, published
atomically when the lane commits; with partition_by=[...] in Hive folders (`col=value/`).
"""
from __future__ import annotations

import csv as _csv
import io
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import fsspec
import pyarrow as pa

from streamfn.connectors.files.readers import (CsvPartition, NdjsonPartition, TablePartition, UnreadableFile,
                                               arrow_batches, parquet_batches)
from streamfn.connectors.files.writers import LaneFileWriter, PartitionedLaneWriter, SharedWriters
from streamfn.batch import Batch, Position
from streamfn.contracts import Sink, Source, SourcePartition
from streamfn.errors import ConfigError
from streamfn.schema import Schema, SchemaLock, normalise_schema
from streamfn.timeparse import parse_duration_s

log = logging.getLogger("streamfn.files")

_EXTENSIONS = {"ndjson": ("jsonl", "ndjson", "json"), "csv": ("csv", "tsv", "txt"),
               "parquet": ("parquet", "pq"), "arrow": ("arrow", "ipc", "feather")}
_GLOB_CHARS = set("*?[")


class Files(Source, Sink):
    """Files of one format under one URL: a source when given to p.source, a sink to .sink."""

    def __init__(self, fmt: str, url: str, *, schema: Schema | None = None, watch: bool = False,
                 watch_interval: str | float = "1s", max_rows_per_file: int = 1_000_000,
                 options: dict[str, Any] | None = None, storage_options: dict[str, Any] | None = None,
                 partition_by: Sequence[str] | None = None, overwrite: bool = False) -> None:
        if not isinstance(url, str) or not url:
            raise ConfigError(f"files.{fmt}() needs a URL or path, got {url!r}")
        if isinstance(partition_by, str) or not all(isinstance(c, str) and c for c in partition_by or ()):
            raise ConfigError(f"files.{fmt}(partition_by=...) takes a list of column names, got {partition_by!r}")
        self.fmt = fmt
        self.url = url
        self.schema = normalise_schema(schema)
        self.watch = watch
        self.watch_interval_s = parse_duration_s(watch_interval)
        self.max_rows_per_file = max_rows_per_file
        self.options = options or {}
        self.partition_by = list(partition_by or [])
        self.overwrite = overwrite
        self._overwritten = False
        self.fs, self.path = fsspec.core.url_to_fs(url, **(storage_options or {}))
        self._lock_schema = SchemaLock(self.schema)
        self._ctx: Any = None
        self._seen: set[str] = set()
        self._stop = threading.Event()
        self._watch_lock = threading.Lock()
        self._watcher: threading.Thread | None = None
        self._run_tag = ""
        self._shared = SharedWriters(self._lane_writer)

    def default_name(self) -> str:
        base = self.path.rstrip("/").rsplit("/", 1)[-1]
        stem = base.split(".", 1)[0].replace("*", "").strip("-_") or self.fmt
        return stem

    def describe(self) -> str:
        return f"files.{self.fmt}({self.url})"

    # -- source -------------------------------------------------------------------------------
    def start(self, ctx: Any) -> None:
        self._ctx = ctx
        self._run_tag = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f"{int(time.time() * 1000) % 1000:03d}"
        if self.overwrite and ctx is not None and any(sink is self for sink in ctx.sinks()):
            self._remove_earlier_output()

    def _remove_earlier_output(self) -> None:
        """overwrite=True: this run's output replaces an earlier run's (removed once, before any write)."""
        if not self._overwritten and self.fs.exists(self.path):
            log.info("overwrite: removing the earlier output", extra={"sink": self.url})
            self.fs.rm(self.path, recursive=True)
        self._overwritten = True

    def _matching(self) -> list[str]:
        path = self.path
        if _GLOB_CHARS & set(path):
            found = self.fs.glob(path)
        elif self.fs.isdir(path):
            exts = _EXTENSIONS[self.fmt]
            found = [p for p in self.fs.find(path) if p.rsplit(".", 1)[-1].lower() in exts]
        elif self.fs.exists(path):
            found = [path]
        else:
            found = []
        names = [p for p in found if not p.rsplit("/", 1)[-1].startswith((".", "_"))]
        return sorted(self.fs.unstrip_protocol(p) if "://" in self.url else p for p in names)

    def partitions(self) -> list[str]:
        found = self._matching()
        if not found and not self.watch:
            raise ConfigError(f"no {self.fmt} files match {self.url!r}")
        self._seen.update(found)
        if self.watch and not self._ctx.until_idle:
            self._watcher = threading.Thread(target=self._watch, name=f"files-watch-{self.default_name()}",
                                             daemon=True)
            self._watcher.start()
        return found

    def _watch(self) -> None:
        while not self._stop.wait(self.watch_interval_s):
            self._add_new()

    def _add_new(self) -> bool:
        with self._watch_lock:  # the watcher thread and the runtime may both ask
            new = [p for p in self._matching() if p not in self._seen]
            self._seen.update(new)
        if new:
            log.info("new files", extra={"source": self.default_name(), "files": len(new)})
            self._ctx.add_partitions(self, new)
        return bool(new)

    def exhausted(self) -> bool:
        if not self.watch:
            return True
        return bool(self._ctx.until_idle) and not self._add_new()

    def open(self, partition: str, resume: Position) -> SourcePartition:
        stream = self.fs.open(partition, "rb")
        if self.fmt == "ndjson":
            return NdjsonPartition(stream, self._lock_schema, resume)
        try:
            if self.fmt == "csv":
                return CsvPartition(stream, self._lock_schema, resume, header=_header(stream, self._separator()),
                                    separator=self._separator(), has_header=self.options.get("has_header", True),
                                    column_names=self.options.get("column_names"), where=partition)
            batch_rows = 65_536
            batches = parquet_batches(stream, batch_rows) if self.fmt == "parquet" else arrow_batches(stream)
            return TablePartition(batches, stream, self._lock_schema, resume, partition)
        except (pa.ArrowException, OSError, UnicodeDecodeError) as exc:
            stream.close()
            log.warning("unreadable file", extra={"source": self.default_name(), "partition": partition,
                                                  "error": f"{type(exc).__name__}: {exc}"})
            return UnreadableFile(partition, exc)

    def _separator(self) -> str:
        return str(self.options.get("separator", ","))

    def stop(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join()

    # -- sink ---------------------------------------------------------------------------------
    def _lane_writer(self, lane: str) -> Sink:
        ext = _EXTENSIONS[self.fmt][0]
        base = self.path.rstrip("/")

        def in_folder(folder: str) -> LaneFileWriter:
            directory = f"{base}/{folder}" if folder else base
            if folder:
                self.fs.makedirs(directory, exist_ok=True)
            return LaneFileWriter(self.fs, directory, self.fmt, ext, lane, self._run_tag or "0",
                                  self.options, self.max_rows_per_file)

        return PartitionedLaneWriter(self.partition_by, in_folder) if self.partition_by else in_folder("")

    def for_lane(self, lane: str) -> Sink:
        if not self._run_tag:
            self.start(self._ctx)
        self.fs.makedirs(self.path.rstrip("/"), exist_ok=True)
        return self._lane_writer(lane)

    def write(self, batch: Batch) -> None:
        self._shared.write(batch)

    def flush(self, checkpoint_id: str) -> None:
        self._shared.flush(checkpoint_id)

    def close(self) -> None:
        self._shared.close()


def _header(stream: Any, separator: str) -> list[str]:
    """The first CSV record's fields (the header, or the width when there is none)."""
    first = stream.readline()
    stream.seek(0)
    return next(_csv.reader(io.StringIO(first.decode("utf-8-sig")), delimiter=separator), [])


def ndjson(url: str, *, schema: Schema | None = None, watch: bool = False, **kw: Any) -> Files:
    """Newline-delimited JSON files (source or sink)."""
    return Files("ndjson", url, schema=schema, watch=watch, **kw)


def csv(url: str, *, schema: Schema | None = None, separator: str = ",", has_header: bool = True,
         column_names: list[str] | None = None, watch: bool = False, **kw: Any) -> Files:
    """CSV files (source or sink)."""
    options = {"separator": separator, "has_header": has_header, "column_names": column_names}
    return Files("csv", url, schema=schema, watch=watch, options=options, **kw)


def parquet(url: str, *, schema: Schema | None = None, compression: str = "zstd", watch: bool = False,
            **kw: Any) -> Files:
    """Parquet files (source or sink; as a sink, partition_by=[...] writes Hive folders)."""
    return Files("parquet", url, schema=schema, watch=watch, options={"compression": compression}, **kw)


def arrow(url: str, *, schema: Schema | None = None, watch: bool = False, **kw: Any) -> Files:
    """Arrow IPC files (source or sink)."""
    return Files("arrow", url, schema=schema, watch=watch, **kw)


__all__ = ["Files", "arrow", "csv", "ndjson", "parquet"]
