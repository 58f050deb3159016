"""Delta Lake tables (the `deltalake` package): an exactly-once sink and a bounded source.

    node.sink(delta.table("s3://lake/ticks", partition_by=["symbol"]))
    node.sink(delta.table("/data/latest", mode="merge", key=["symbol"]))
    p.source(delta.table("/data/ticks", version=12))      # a backfill from a fixed version

Each commit of a lane is one Delta commit carrying a `txn` action: appId
"PIPELINE/LANE" and, as its version, the highest source offset of the rows in it. On
restart a lane reads its txn version back and drops replayed rows at or below it.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
from typing import Any

import polars as pl
import pyarrow as pa

from streamfn._optional import import_optional
from streamfn.batch import Batch, Position
from streamfn.connectors._exactly_once import (BatchesPartition, LaneWriter, Pending, Progress, SchemaMismatch,
                                               describe_schema, last_per_key, micros_utc, with_retries)
from streamfn.contracts import Sink, Source, SourcePartition
from streamfn.errors import ConfigError, StreamfnError

log = logging.getLogger("streamfn.delta")

_MODES = ("append", "merge")


def _dl() -> Any:
    return import_optional("deltalake", extra="delta")


def storage_options_for(url: str, given: dict[str, str] | None = None) -> dict[str, str] | None:
    """Object-store options: from the environment for s3:// (endpoint, plain HTTP), then `given`."""
    if not url.startswith(("s3://", "s3a://")):
        return given
    opts: dict[str, str] = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("S3_ENDPOINT_URL")
    if endpoint:
        opts["AWS_ENDPOINT_URL"] = endpoint
        if endpoint.startswith("http://"):
            opts["AWS_ALLOW_HTTP"] = "true"
    opts["AWS_REGION"] = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION", "us-east-1")
    # one process serialises its commits (see commit_lock); several writer processes on S3
    # need a lock provider (e.g. AWS_S3_LOCKING_PROVIDER=dynamodb) passed in storage_options
    if not {"AWS_S3_LOCKING_PROVIDER", "aws_conditional_put", "conditional_put"} & set(given or {}):
        opts["AWS_S3_ALLOW_UNSAFE_RENAME"] = "true"
    opts.update(given or {})
    return opts


class DeltaTableConnector(Source, Sink):
    """One Delta table: a sink when given to .sink, a bounded source when given to p.source."""

    def __init__(self, url: str, *, mode: str, key: list[str] | None, partition_by: list[str] | None,
                 storage_options: dict[str, str] | None, schema_mode: str | None, version: int | None,
                 retries: int, retry_backoff_s: float, max_buffer_rows: int) -> None:
        if mode not in _MODES:
            raise ConfigError(f"delta.table mode must be one of {_MODES}, got {mode!r}")
        if mode == "merge" and not key:
            raise ConfigError("delta.table(mode='merge') needs key=[...] (the columns rows are matched on)")
        self.url = url.rstrip("/")
        self.mode, self.key, self.partition_by = mode, list(key or []), list(partition_by or []) or None
        self.storage_options = storage_options_for(url, storage_options)
        self.schema_mode, self.version = schema_mode, version
        self.retries, self.retry_backoff_s, self.max_buffer_rows = retries, retry_backoff_s, max_buffer_rows
        self.pipeline = "default"
        # S3 without a lock provider renames unsafely, so lanes of one process commit one at a
        # time there; elsewhere (local files) commits are atomic and lanes write in parallel
        unsafe = (self.storage_options or {}).get("AWS_S3_ALLOW_UNSAFE_RENAME", "").lower() == "true"
        self.commit_lock: Any = threading.Lock() if unsafe else contextlib.nullcontext()

    def default_name(self) -> str:
        return self.url.rsplit("/", 1)[-1] or "delta"

    def describe(self) -> str:
        return f"delta.table({self.url}, mode={self.mode})"

    def open_table(self, version: int | None = None) -> Any | None:
        """The DeltaTable, or None when nothing is at the URL yet."""
        dl = _dl()
        if not dl.DeltaTable.is_deltatable(self.url, storage_options=self.storage_options):
            return None
        return dl.DeltaTable(self.url, version=version, storage_options=self.storage_options)

    # -- sink -------------------------------------------------------------------------------------
    def start(self, ctx: Any) -> None:
        self.pipeline = ctx.pipeline

    def for_lane(self, lane: str) -> Sink:
        return _DeltaLaneWriter(self, lane)

    def write(self, batch: Batch) -> None:
        raise ConfigError("delta.table writes through per-lane writers; the runtime calls for_lane()")

    def flush(self, checkpoint_id: str) -> None:
        """Each lane's writer commits its own rows."""

    # -- source -----------------------------------------------------------------------------------
    def partitions(self) -> list[str]:
        dt = self.open_table(self.version)
        if dt is None:
            raise ConfigError(f"no Delta table at {self.url}")
        if self.version is None:
            self.version = dt.version()  # every lane of this run reads the same snapshot
        return ["0"]

    def open(self, partition: str, resume: Position) -> SourcePartition:
        dt = self.open_table(self.version)
        assert dt is not None
        return BatchesPartition(dt.to_pyarrow_dataset().to_batches(), resume)


class _DeltaLaneWriter(LaneWriter):
    """One lane's rows: buffered, then one Delta commit (with its txn action) per checkpoint."""

    def __init__(self, parent: DeltaTableConnector, lane: str) -> None:
        super().__init__(lane, idempotent=parent.mode == "merge", max_buffer_rows=parent.max_buffer_rows)
        self.parent = parent
        self.app_id = f"{parent.pipeline}/{lane}"
        self._txn_version = -1

    def _retry(self, action: Any) -> Any:
        errors = _dl().exceptions
        return with_retries(action, what=f"delta table {self.parent.url}", retries=self.parent.retries,
                            retryable=(OSError, errors.CommitFailedError),
                            backoff_s=self.parent.retry_backoff_s)

    def _load(self) -> Progress:
        dt = self.parent.open_table()
        version = None if dt is None else dt.transaction_version(self.app_id)
        self._txn_version = -1 if version is None else int(version)
        return Progress(None, None if version is None else int(version))

    def _rows(self, frame: pl.DataFrame) -> pa.Table:
        return micros_utc(frame.to_arrow())

    def _store(self, pending: Pending, progress: Progress, checkpoint_id: str | None) -> None:
        # the txn version is the highest source offset; without int offsets it just counts commits
        version = progress.high_offset if progress.high_offset is not None else self._txn_version + 1
        with self.parent.commit_lock:
            self._retry(lambda: self._write(pending.table(), version, checkpoint_id))
        self._txn_version = version

    def _write(self, rows: pa.Table, version: int, checkpoint_id: str | None) -> None:
        dl, p = _dl(), self.parent
        props = dl.CommitProperties(
            app_transactions=[dl.Transaction(self.app_id, version)],
            custom_metadata={"streamfn.pipeline": p.pipeline, "streamfn.lane": self.lane,
                             "streamfn.checkpoint": checkpoint_id or ""})
        dt = p.open_table()
        try:
            if p.mode == "merge" and dt is not None:
                rows = last_per_key(rows, p.key)
                predicate = " AND ".join(f't."{k}" = s."{k}"' for k in p.key)
                (dt.merge(rows, predicate, source_alias="s", target_alias="t", commit_properties=props)
                 .when_matched_update_all().when_not_matched_insert_all().execute())
            else:
                dl.write_deltalake(dt if dt is not None else p.url, rows, mode="append",
                                   partition_by=p.partition_by, schema_mode=p.schema_mode,
                                   storage_options=p.storage_options, commit_properties=props)
        except (dl.exceptions.SchemaMismatchError, dl.exceptions.DeltaError) as exc:
            if isinstance(exc, dl.exceptions.CommitFailedError) or not (
                    isinstance(exc, dl.exceptions.SchemaMismatchError) or "schema" in str(exc).lower()):
                raise
            expected = "?" if dt is None else describe_schema(pa.schema(dt.schema().to_arrow()))
            raise SchemaMismatch(f"delta table {p.url}: the batch ({describe_schema(rows.schema)}) does not "
                                 f"fit the table ({expected}): {exc}; pass schema_mode='merge' to add "
                                 "columns, or cast in a stage") from exc


def table(url: str, *, mode: str = "append", key: list[str] | None = None,
          partition_by: list[str] | None = None, storage_options: dict[str, str] | None = None,
          schema_mode: str | None = None, version: int | None = None, retries: int = 5,
          retry_backoff_s: float = 0.5, max_buffer_rows: int = 1_000_000) -> DeltaTableConnector:
    """A Delta table: an exactly-once sink (`append`, or `merge` on `key`), or a bounded source.

    Args:
        url: a local path or an object-store URL (s3://...; AWS_* / S3_ENDPOINT_URL are read).
        schema_mode: "merge" lets a batch add columns to the table.
        version: as a source, read this version (default: the latest when the run starts).
    """
    return DeltaTableConnector(url, mode=mode, key=key, partition_by=partition_by,
                               storage_options=storage_options, schema_mode=schema_mode, version=version,
                               retries=retries, retry_backoff_s=retry_backoff_s,
                               max_buffer_rows=max_buffer_rows)


def optimize(url: str, *, vacuum: bool = False, retention_hours: int | None = None,
             storage_options: dict[str, str] | None = None) -> dict[str, Any]:
    """Compact small files into larger ones and, with vacuum, delete files no version needs."""
    dl = _dl()
    opts = storage_options_for(url, storage_options)
    if not dl.DeltaTable.is_deltatable(url, storage_options=opts):
        raise ConfigError(f"no Delta table at {url}")
    dt = dl.DeltaTable(url, storage_options=opts)
    metrics = dt.optimize.compact()
    result: dict[str, Any] = {"url": url, "version": dt.version(),
                              "files_added": metrics.get("numFilesAdded"),
                              "files_removed": metrics.get("numFilesRemoved")}
    if vacuum:
        removed = dt.vacuum(retention_hours=retention_hours, dry_run=False)
        result["vacuumed_files"] = len(removed)
    return result


def optimize_cli(url: str, vacuum: bool) -> int:
    """`streamfn table optimize URL [--vacuum]`: print what was done as JSON; exit status."""
    try:
        result = optimize(url, vacuum=vacuum)
    except (StreamfnError, OSError) as exc:
        print(f"streamfn table optimize: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


__all__ = ["DeltaTableConnector", "optimize", "optimize_cli", "table"]
