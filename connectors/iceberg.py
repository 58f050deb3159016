"""Apache Iceberg tables (`pyiceberg`): an exactly-once sink and a bounded source.

    node.sink(iceberg.table("lake/catalog.db", "market.ticks"))           # SQL catalog, SQLite file
    node.sink(iceberg.table("http://rest:8181", "market.latest", mode="upsert", key=["symbol"]))
    p.source(iceberg.table(None, "market.ticks", snapshot_id=123))        # a backfill

Each commit of a lane is one Iceberg snapshot whose summary carries `streamfn.app`
("PIPELINE/LANE"), `streamfn.checkpoint` and `streamfn.high-offset`. On restart a lane finds
its last such snapshot among the table's ancestors and drops replayed rows at or below it.
"""
from __future__ import annotations

import logging
import os
import threading
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import polars as pl
import pyarrow as pa

from streamfn._optional import import_optional
from streamfn.batch import Batch, Position
from streamfn.connectors._exactly_once import (BatchesPartition, LaneWriter, Pending, Progress, SchemaMismatch,
                                               describe_schema, last_per_key, micros_utc, with_retries)
from streamfn.contracts import Sink, Source, SourcePartition
from streamfn.errors import ConfigError

log = logging.getLogger("streamfn.iceberg")

_MODES = ("append", "upsert")
DEFAULT_DIR = ".streamfn/iceberg"
Catalog = Any  # pyiceberg.catalog.Catalog, imported at first use
Written = tuple[int, list[Any]] | None  # (partition spec id, pyiceberg DataFiles); None: not written


def _s3_properties() -> dict[str, str]:
    """pyiceberg FileIO settings for S3 taken from the usual AWS_* variables."""
    props: dict[str, str] = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("S3_ENDPOINT_URL")
    if endpoint:
        props["s3.endpoint"] = endpoint
    for env, key in (("AWS_ACCESS_KEY_ID", "s3.access-key-id"), ("AWS_SECRET_ACCESS_KEY", "s3.secret-access-key"),
                     ("AWS_REGION", "s3.region"), ("AWS_DEFAULT_REGION", "s3.region")):
        if os.environ.get(env) and key not in props:
            props[key] = os.environ[env]
    return props


def load_catalog(catalog: str | dict[str, str] | Catalog | None, *, warehouse: str | None = None) -> Catalog:
    """A pyiceberg catalog from a SQLite path / SQL URI, a REST URL, a property dict, or None (local)."""
    catalog_mod = import_optional("pyiceberg.catalog", extra="iceberg")
    if catalog is not None and not isinstance(catalog, (str, dict)):
        return catalog
    if isinstance(catalog, dict):
        props = dict(catalog)
        return catalog_mod.load_catalog(props.pop("name", "streamfn"), **{**_s3_properties(), **props})
    if catalog is not None and catalog.startswith(("http://", "https://")):
        props = {"type": "rest", "uri": catalog, **_s3_properties()}
        if warehouse:
            props["warehouse"] = warehouse
        return catalog_mod.load_catalog("rest", **props)
    path = catalog or os.path.join(DEFAULT_DIR, "catalog.db")
    uri = path if "://" in path else f"sqlite:///{os.path.abspath(path)}"
    if warehouse is None:
        if "://" in path and not path.startswith("sqlite:"):
            raise ConfigError(f"iceberg catalog {path!r} needs warehouse= (where table files go)")
        base = os.path.dirname(os.path.abspath(path.removeprefix("sqlite:///")))
        warehouse = f"file://{os.path.join(base, 'warehouse')}"
        os.makedirs(warehouse.removeprefix("file://"), exist_ok=True)
    elif uri.startswith("sqlite:"):
        os.makedirs(os.path.dirname(uri.removeprefix("sqlite:///")) or ".", exist_ok=True)
    sql = import_optional("pyiceberg.catalog.sql", extra="iceberg")
    return sql.SqlCatalog("streamfn", uri=uri, warehouse=warehouse, **_s3_properties())


class IcebergTable(Source, Sink):
    """One Iceberg table: a sink when given to .sink, a bounded source when given to p.source."""

    def __init__(self, catalog: str | dict[str, str] | Catalog | None, identifier: str, *, mode: str,
                 key: list[str] | None, warehouse: str | None, create: bool, evolve_schema: bool,
                 snapshot_id: int | None, retries: int, retry_backoff_s: float, max_buffer_rows: int,
                 file_bytes: int) -> None:
        if mode not in _MODES:
            raise ConfigError(f"iceberg.table mode must be one of {_MODES}, got {mode!r}")
        if mode == "upsert" and not key:
            raise ConfigError("iceberg.table(mode='upsert') needs key=[...] (the columns rows are matched on)")
        if "." not in identifier:
            raise ConfigError(f"iceberg table identifier must be 'namespace.table', got {identifier!r}")
        self._catalog_arg, self.warehouse = catalog, warehouse
        self.identifier, self.mode, self.key = identifier, mode, list(key or [])
        self.create, self.evolve_schema, self.snapshot_id = create, evolve_schema, snapshot_id
        self.retries, self.retry_backoff_s, self.max_buffer_rows = retries, retry_backoff_s, max_buffer_rows
        self.pipeline = "default"
        self.file_bytes = file_bytes
        self.commit_lock = threading.Lock()  # lanes of one process commit one at a time
        self._catalog: Catalog | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    def writers(self) -> ThreadPoolExecutor:
        """The threads that write data files behind the lanes (started at first use)."""
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="streamfn-iceberg-write")
            return self._pool

    def close(self) -> None:
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    def default_name(self) -> str:
        return self.identifier.rsplit(".", 1)[-1]

    def describe(self) -> str:
        return f"iceberg.table({self.identifier}, mode={self.mode})"

    @property
    def catalog(self) -> Catalog:
        if self._catalog is None:
            self._catalog = load_catalog(self._catalog_arg, warehouse=self.warehouse)
        return self._catalog

    def load(self) -> Any | None:
        """The table, or None when it does not exist yet."""
        exc = import_optional("pyiceberg.exceptions", extra="iceberg")
        try:
            return self.catalog.load_table(self.identifier)
        except (exc.NoSuchTableError, exc.NoSuchNamespaceError):
            return None

    def load_or_create(self, schema: pa.Schema) -> Any:
        """The table, created from the batch's schema when missing (and create=True)."""
        found = self.load()
        if found is not None:
            return found
        if not self.create:
            raise ConfigError(f"iceberg table {self.identifier} does not exist; create it or pass create=True")
        exc = import_optional("pyiceberg.exceptions", extra="iceberg")
        namespace = self.identifier.rsplit(".", 1)[0]
        self.catalog.create_namespace_if_not_exists(namespace)
        try:
            return self.catalog.create_table(self.identifier, schema=schema)
        except exc.TableAlreadyExistsError:
            return self.catalog.load_table(self.identifier)

    # -- sink -------------------------------------------------------------------------------------
    def start(self, ctx: Any) -> None:
        self.pipeline = ctx.pipeline

    def for_lane(self, lane: str) -> Sink:
        return _IcebergLaneWriter(self, lane)

    def write(self, batch: Batch) -> None:
        raise ConfigError("iceberg.table writes through per-lane writers; the runtime calls for_lane()")

    def flush(self, checkpoint_id: str) -> None:
        """Each lane's writer commits its own rows."""

    # -- source -----------------------------------------------------------------------------------
    def partitions(self) -> list[str]:
        found = self.load()
        if found is None:
            raise ConfigError(f"no iceberg table {self.identifier}")
        if self.snapshot_id is None and found.current_snapshot() is not None:
            self.snapshot_id = found.current_snapshot().snapshot_id  # one snapshot for the whole run
        return ["0"]

    def open(self, partition: str, resume: Position) -> SourcePartition:
        found = self.load()
        assert found is not None
        reader = found.scan(snapshot_id=self.snapshot_id).to_arrow_batch_reader()
        return BatchesPartition(reader, resume, on_close=reader.close)


def _progress_of(tbl: Any, app_id: str) -> Progress:
    """The last checkpoint and offset this lane committed, from the snapshot summaries."""
    snapshots = import_optional("pyiceberg.table.snapshots", extra="iceberg")
    current = tbl.current_snapshot()
    if current is None:
        return Progress()
    for snap in snapshots.ancestors_of(current, tbl.metadata):
        props = snap.summary.additional_properties if snap.summary is not None else {}
        if props.get("streamfn.app") == app_id:
            high = props.get("streamfn.high-offset")
            return Progress(props.get("streamfn.checkpoint") or None, int(high) if high else None)
    return Progress()


class _IcebergLaneWriter(LaneWriter):
    """One lane's rows: buffered, then one snapshot per checkpoint with the lane's progress."""

    def __init__(self, parent: IcebergTable, lane: str) -> None:
        super().__init__(lane, idempotent=parent.mode == "upsert", max_buffer_rows=parent.max_buffer_rows)
        self.parent = parent
        self.app_id = f"{parent.pipeline}/{lane}"
        self._unwritten: list[pa.Table] = []  # buffered rows not yet in a data file
        self._unwritten_bytes = 0
        self._writes: list[Future[Written]] = []  # data files for the next snapshot, being written

    def _retry(self, action: Any) -> Any:
        exc = import_optional("pyiceberg.exceptions", extra="iceberg")
        retryable = (OSError, exc.CommitFailedException, exc.ServiceUnavailableError, exc.ServerError,
                     ConnectionError)
        return with_retries(action, what=f"iceberg table {self.parent.identifier}", retryable=retryable,
                            retries=self.parent.retries, backoff_s=self.parent.retry_backoff_s)

    def _load(self) -> Progress:
        tbl = self.parent.load()
        return Progress() if tbl is None else _progress_of(tbl, self.app_id)

    def _rows(self, frame: pl.DataFrame) -> pa.Table:
        return micros_utc(frame.to_arrow())

    def _buffered(self, rows: pa.Table) -> None:
        if self.parent.mode == "upsert":
            return  # an upsert reads the matched rows: it runs whole at the checkpoint
        self._unwritten.append(rows)
        self._unwritten_bytes += rows.nbytes
        if self._unwritten_bytes >= self.parent.file_bytes:
            # write-behind: this data file is written while the lane reads on; the snapshot
            # that adds it to the table is still committed at the checkpoint, with the progress
            self._writes.append(self.parent.writers().submit(self._write_files, self._take_unwritten()))

    def _take_unwritten(self) -> pa.Table:
        rows = pa.concat_tables(self._unwritten, promote_options="permissive")
        self._unwritten, self._unwritten_bytes = [], 0
        return rows

    def _write_files(self, rows: pa.Table) -> Written:
        """Write rows as data files of the table (created, or given new columns, first)."""
        with self.parent.commit_lock:  # one lane at a time creates the table or adds columns to it
            tbl, rows = self._retry(lambda: self._prepare(rows))
        return self._retry(lambda: _data_files(tbl, rows))

    def _discard(self) -> None:
        for write in self._writes:
            write.cancel()  # files already written stay unreferenced (orphan-file maintenance)
        self._writes, self._unwritten, self._unwritten_bytes = [], [], 0

    def _store(self, pending: Pending, progress: Progress, checkpoint_id: str | None) -> None:
        summary = {"streamfn.app": self.app_id, "streamfn.checkpoint": progress.checkpoint_id or "",
                   "streamfn.high-offset": "" if progress.high_offset is None else str(progress.high_offset)}
        lock = self.parent.commit_lock
        if self.parent.mode == "upsert":
            rows = pending.table()
            with lock:
                self._retry(lambda: self._upsert(rows, summary))
            return
        writes, self._writes = self._writes, []
        written = [write.result() for write in writes]  # a write that failed raises here
        if self._unwritten:
            written.append(self._write_files(self._take_unwritten()))
        # only the snapshot commit (small metadata files) waits for the other lanes
        with lock:
            self._retry(lambda: self._append(pending, written, summary))

    def _prepare(self, rows: pa.Table) -> tuple[Any, pa.Table]:
        tbl = self.parent.load_or_create(rows.schema)
        return tbl, self._fit(tbl, rows)

    def _upsert(self, rows: pa.Table, summary: dict[str, str]) -> None:
        tbl = self.parent.load_or_create(rows.schema)
        schema_id = tbl.schema().schema_id
        rows = self._fit(tbl, rows)
        if tbl.schema().schema_id != schema_id and tbl.current_snapshot() is not None:
            # pyiceberg's upsert reads the matched rows with the schema of the branch head's
            # snapshot: an empty snapshot under the new schema lets it see the added columns
            tbl.append(rows.slice(0, 0))
        key = self.parent.key
        tbl.upsert(last_per_key(rows, key), join_cols=key, snapshot_properties=summary)

    def _append(self, pending: Pending, written: list[Written], summary: dict[str, str]) -> None:
        """Commit one snapshot adding the written data files (or, failing that, the rows)."""
        tbl = self.parent.load()
        assert tbl is not None  # created before its first data file was written
        spec_id = tbl.spec().spec_id
        if any(w is None or w[0] != spec_id for w in written):  # no helper, or the partitioning changed
            tbl.append(self._fit(tbl, pending.table()), snapshot_properties=summary)
            return
        merge = tbl.metadata.properties.get("commit.manifest-merge.enabled", "false").lower() == "true"
        with tbl.transaction() as tx:
            update = tx.update_snapshot(snapshot_properties=summary)
            with (update.merge_append() if merge else update.fast_append()) as append:
                for w in written:
                    for data_file in w[1]:  # type: ignore[index]  # None is handled above
                        append.append_data_file(data_file)

    def _fit(self, tbl: Any, rows: pa.Table) -> pa.Table:
        """Add new columns to the table (schema evolution); cast rows to its types or say why not."""
        p = self.parent
        expected = tbl.schema().as_arrow()
        added = [n for n in rows.schema.names if n not in expected.names]
        if added:
            if not p.evolve_schema:
                raise SchemaMismatch(f"iceberg table {p.identifier}: the batch adds columns {added}; "
                                     f"table ({describe_schema(expected)}); pass evolve_schema=True")
            with tbl.update_schema() as update:
                update.union_by_name(rows.schema)
            log.info("columns added", extra={"table": p.identifier, "columns": added})
            expected = tbl.schema().as_arrow()
        fields = []
        for name in expected.names:
            if name not in rows.schema.names:
                continue  # a column the batch lacks is written as nulls by pyiceberg
            want, got = expected.field(name).type, rows.schema.field(name).type
            if _kind(want) != _kind(got):
                raise SchemaMismatch(f"iceberg table {p.identifier}: column {name} is {want}, the batch gives "
                                     f"{got}; table ({describe_schema(expected)}), batch "
                                     f"({describe_schema(rows.schema)})")
            fields.append(pa.field(name, want, rows.schema.field(name).nullable))
        names = [f.name for f in fields]
        return rows.select(names).cast(pa.schema(fields))


def _data_files(tbl: Any, rows: pa.Table) -> Written:
    """Write rows as the table's Parquet data files, not yet in any snapshot: (spec id, files).

    The same pyiceberg helper `table.append` writes with; None where this pyiceberg lacks it.
    A crash before the commit leaves unreferenced files, removed by orphan-file maintenance.
    """
    try:
        from pyiceberg.io.pyarrow import _dataframe_to_data_files
    except ImportError:
        return None
    files = _dataframe_to_data_files(table_metadata=tbl.metadata, df=rows, io=tbl.io, write_uuid=uuid.uuid4())
    return tbl.spec().spec_id, list(files)


def _kind(t: pa.DataType) -> str:
    """Types that cast losslessly into each other share a kind (int32 -> int64, string sizes)."""
    if pa.types.is_integer(t):
        return "int"
    if pa.types.is_floating(t):
        return "float"
    if pa.types.is_string(t) or pa.types.is_large_string(t) or t == pa.string_view():
        return "string"
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return "binary"
    if pa.types.is_timestamp(t):
        return "timestamptz" if t.tz else "timestamp"
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return "list<" + _kind(t.value_type) + ">"
    if pa.types.is_decimal(t):
        return f"decimal({t.precision},{t.scale})"
    return str(t)


def table(catalog: str | dict[str, str] | Catalog | None, identifier: str, *, mode: str = "append",
          key: list[str] | None = None, warehouse: str | None = None, create: bool = True,
          evolve_schema: bool = True, snapshot_id: int | None = None, retries: int = 5,
          retry_backoff_s: float = 0.5, max_buffer_rows: int = 1_000_000,
          file_bytes: int = 32 << 20) -> IcebergTable:
    """An Iceberg table: an exactly-once sink (`append`, or `upsert` on `key`), or a bounded source.

    Args:
        catalog: a SQLite file path or SQLAlchemy URI (SQL catalog), an http(s) REST catalog URL,
            a dict of pyiceberg catalog properties, a pyiceberg Catalog, or None for
            .streamfn/iceberg/catalog.db with its warehouse beside it.
        identifier: "namespace.table".
        warehouse: where a SQL catalog puts table files (file://..., s3://...).
        evolve_schema: let a batch with new columns add them to the table.
        snapshot_id: as a source, read this snapshot (default: the current one when the run starts).
        file_bytes: a lane writes its buffered rows out as a data file once they take this many
            bytes in memory (while it reads on); the snapshot adding them waits for the checkpoint.
    """
    return IcebergTable(catalog, identifier, mode=mode, key=key, warehouse=warehouse, create=create,
                        evolve_schema=evolve_schema, snapshot_id=snapshot_id, retries=retries,
                        retry_backoff_s=retry_backoff_s, max_buffer_rows=max_buffer_rows, file_bytes=file_bytes)


__all__ = ["IcebergTable", "load_catalog", "table"]
