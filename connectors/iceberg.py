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
from typing import Any

import polars as pl
import pyarrow as pa

from streamfn._optional import import_optional
from streamfn.batch import Batch, Position
from streamfn.connectors._exactly_once import (Pending, Progress, ReplayFilter, SchemaMismatch,
                                               already_committed, describe_schema, plain_arrow, with_retries)
from streamfn.contracts import Sink, Source, SourcePartition
from streamfn.errors import ConfigError, EndOfInput

log = logging.getLogger("streamfn.iceberg")

_MODES = ("append", "upsert")
DEFAULT_DIR = ".streamfn/iceberg"
Catalog = Any  # pyiceberg.catalog.Catalog, imported at first use


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


def _iceberg_ready(table: pa.Table) -> pa.Table:
    """Iceberg stores timestamps in microseconds (UTC when zoned) and no view types."""
    table = plain_arrow(table)
    fields = []
    for f in table.schema:
        t = f.type
        if pa.types.is_timestamp(t) and (t.unit != "us" or (t.tz and t.tz != "UTC")):
            t = pa.timestamp("us", "UTC" if t.tz else None)
        fields.append(pa.field(f.name, t, f.nullable))
    target = pa.schema(fields)
    return table if target.equals(table.schema) else table.cast(target)


class IcebergTable(Source, Sink):
    """One Iceberg table: a sink when given to .sink, a bounded source when given to p.source."""

    def __init__(self, catalog: str | dict[str, str] | Catalog | None, identifier: str, *, mode: str,
                 key: list[str] | None, warehouse: str | None, create: bool, evolve_schema: bool,
                 snapshot_id: int | None, retries: int, retry_backoff_s: float, max_buffer_rows: int) -> None:
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
        self.commit_lock = threading.Lock()  # lanes of one process commit one at a time
        self._catalog: Catalog | None = None

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
        return _ReaderPartition(reader, resume)


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


class _IcebergLaneWriter(Sink):
    """One lane's rows: buffered, then one snapshot per checkpoint with the lane's progress."""

    def __init__(self, parent: IcebergTable, lane: str) -> None:
        self.parent, self.lane = parent, lane
        self.app_id = f"{parent.pipeline}/{lane}"
        self._filter: ReplayFilter | None = None
        self._committed = Progress()
        self._pending = Pending()

    def _retry(self, action: Any) -> Any:
        exc = import_optional("pyiceberg.exceptions", extra="iceberg")
        retryable = (OSError, exc.CommitFailedException, exc.ServiceUnavailableError, exc.ServerError,
                     ConnectionError)
        return with_retries(action, what=f"iceberg table {self.parent.identifier}", retryable=retryable,
                            retries=self.parent.retries, backoff_s=self.parent.retry_backoff_s)

    def _load(self) -> Progress:
        tbl = self.parent.load()
        return Progress() if tbl is None else _progress_of(tbl, self.app_id)

    def _replay_filter(self) -> ReplayFilter:
        if self._filter is None:
            self._committed = self._retry(self._load)
            self._filter = ReplayFilter(self._committed, self.lane, idempotent=self.parent.mode == "upsert")
        return self._filter

    def replayed_until(self) -> Position:
        return self._replay_filter().committed.high_offset

    def write(self, batch: Batch) -> None:
        frame = self._replay_filter().admit(batch)
        if frame is None or frame.height == 0:
            return
        self._pending.add(_iceberg_ready(frame.to_arrow()), batch)
        if self._pending.rows >= self.parent.max_buffer_rows:
            self._commit(None)

    def flush(self, checkpoint_id: str) -> None:
        self._replay_filter()
        if already_committed(checkpoint_id, self._committed):
            self._pending = Pending()
            return
        if self._pending.rows:
            self._commit(checkpoint_id)

    def _commit(self, checkpoint_id: str | None) -> None:
        pending = self._pending
        progress = pending.progress(checkpoint_id, self._committed)
        summary = {"streamfn.app": self.app_id, "streamfn.checkpoint": progress.checkpoint_id or "",
                   "streamfn.high-offset": "" if progress.high_offset is None else str(progress.high_offset)}
        rows = pending.table()
        with self.parent.commit_lock:
            self._retry(lambda: self._write(rows, summary))
        self._committed = progress
        self._pending = Pending()

    def _write(self, rows: pa.Table, summary: dict[str, str]) -> None:
        p = self.parent
        tbl = p.load_or_create(rows.schema)
        rows = self._fit(tbl, rows)
        if p.mode == "upsert":
            frame = pl.from_arrow(rows)
            assert isinstance(frame, pl.DataFrame)
            rows = frame.unique(subset=p.key, keep="last", maintain_order=True).to_arrow().cast(rows.schema)
            tbl.upsert(rows, join_cols=p.key, snapshot_properties=summary)
        else:
            tbl.append(rows, snapshot_properties=summary)

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


class _ReaderPartition(SourcePartition):
    """A snapshot's rows from a record batch reader; position = rows already returned."""

    def __init__(self, reader: Any, resume: Position) -> None:
        self._reader = reader
        self._rest: pa.Table | None = None
        self._rows = 0
        skip = int(resume or 0)
        while self._rows < skip and self._take(skip - self._rows) is not None:
            pass

    def _take(self, max_rows: int) -> pa.Table | None:
        while self._rest is None or self._rest.num_rows == 0:
            try:
                self._rest = pa.Table.from_batches([self._reader.read_next_batch()])
            except StopIteration:
                return None
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
        self._reader.close()


def table(catalog: str | dict[str, str] | Catalog | None, identifier: str, *, mode: str = "append",
          key: list[str] | None = None, warehouse: str | None = None, create: bool = True,
          evolve_schema: bool = True, snapshot_id: int | None = None, retries: int = 5,
          retry_backoff_s: float = 0.5, max_buffer_rows: int = 1_000_000) -> IcebergTable:
    """An Iceberg table: an exactly-once sink (`append`, or `upsert` on `key`), or a bounded source.

    Args:
        catalog: a SQLite file path or SQLAlchemy URI (SQL catalog), an http(s) REST catalog URL,
            a dict of pyiceberg catalog properties, a pyiceberg Catalog, or None for
            .streamfn/iceberg/catalog.db with its warehouse beside it.
        identifier: "namespace.table".
        warehouse: where a SQL catalog puts table files (file://..., s3://...).
        evolve_schema: let a batch with new columns add them to the table.
        snapshot_id: as a source, read this snapshot (default: the current one when the run starts).
    """
    return IcebergTable(catalog, identifier, mode=mode, key=key, warehouse=warehouse, create=create,
                        evolve_schema=evolve_schema, snapshot_id=snapshot_id, retries=retries,
                        retry_backoff_s=retry_backoff_s, max_buffer_rows=max_buffer_rows)


__all__ = ["IcebergTable", "load_catalog", "table"]
