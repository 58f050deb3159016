"""PostgreSQL: a table sink (append or upsert, exactly once) and a bounded query source.

    p.source(files.ndjson("ticks/*.jsonl")).sink(postgres.table("ticks", dsn="env:PG_DSN"))
    p.source(postgres.query("select * from ticks order by ts"))

Rows go in with the binary COPY protocol of ADBC's PostgreSQL driver: it writes Arrow
columns straight into COPY BINARY (1.3M rows/s here with a timestamptz column, against
0.36M for psycopg 3's per-row `write_row`, which needs Python objects per value). Each
commit writes a lane's rows and its progress row (pipeline, lane, table -> checkpoint id,
highest source offset) in one transaction; see docs/postgres.md for the argument.
"""
from __future__ import annotations

import logging
import os
import threading
import urllib.parse
from typing import Any

import pyarrow as pa

from streamfn._optional import import_optional
from streamfn.batch import Batch, Position
from streamfn.connectors._exactly_once import (BatchesPartition, LaneWriter, Pending, Progress, SchemaMismatch,
                                               last_per_key, with_retries)
from streamfn.connectors._postgres_types import (check_and_cast, plain_columns, column_ddl, quote_ident,
                                                 quote_literal, split_name)
from streamfn.contracts import Sink, Source, SourcePartition
from streamfn.errors import ConfigError

log = logging.getLogger("streamfn.postgres")

_MODES = ("append", "upsert")


def resolve_dsn(dsn: str | None, password_file: str | None = None) -> str:
    """The connection URI: given, `env:VAR`, `file:PATH`, or $STREAMFN_POSTGRES_DSN / $DATABASE_URL."""
    if dsn is None:
        dsn = os.environ.get("STREAMFN_POSTGRES_DSN") or os.environ.get("DATABASE_URL")
        if not dsn:
            raise ConfigError("no PostgreSQL DSN: pass dsn=, or set STREAMFN_POSTGRES_DSN or DATABASE_URL")
    elif dsn.startswith("env:"):
        name = dsn[4:]
        if not os.environ.get(name):
            raise ConfigError(f"the environment variable {name} (named by dsn='env:{name}') is not set")
        dsn = os.environ[name]
    elif dsn.startswith("file:"):
        with open(dsn[5:], encoding="utf-8") as fh:
            dsn = fh.read().strip()
    if password_file is not None:
        with open(password_file, encoding="utf-8") as fh:
            password = fh.read().strip()
        parts = urllib.parse.urlsplit(dsn)
        user = parts.username or ""
        host = parts.hostname or ""
        netloc = f"{urllib.parse.quote(user)}:{urllib.parse.quote(password, safe='')}@{host}"
        if parts.port:
            netloc += f":{parts.port}"
        dsn = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    return dsn


def _safe_dsn(dsn: str) -> str:
    """host:port/db for logs: never the user's password."""
    parts = urllib.parse.urlsplit(dsn)
    return f"{parts.hostname}:{parts.port or 5432}{parts.path}"


def _connect(dsn: str) -> Any:
    dbapi = import_optional("adbc_driver_postgresql.dbapi", extra="postgres")
    return dbapi.connect(dsn)


def _retryable() -> tuple[type[BaseException], ...]:
    manager = import_optional("adbc_driver_manager", extra="postgres")
    return (manager.OperationalError, manager.InterfaceError, manager.InternalError, OSError)


class PostgresTable(Sink):
    """A table written by every lane, each lane on its own connection and transaction."""

    def __init__(self, table: str, *, dsn: str | None, mode: str, key: list[str] | None, create: bool,
                 password_file: str | None, progress_table: str, retries: int, retry_backoff_s: float,
                 max_buffer_rows: int) -> None:
        if mode not in _MODES:
            raise ConfigError(f"postgres.table mode must be one of {_MODES}, got {mode!r}")
        if mode == "upsert" and not key:
            raise ConfigError("postgres.table(mode='upsert') needs key=[...] (the conflict columns)")
        self.table = table
        self.schema_name, self.table_name = split_name(table)
        self.qualified = f"{quote_ident(self.schema_name)}.{quote_ident(self.table_name)}"
        self._dsn_arg, self._password_file = dsn, password_file
        self.mode, self.key, self.create = mode, list(key or []), create
        self.progress_table = progress_table
        self.retries, self.retry_backoff_s = retries, retry_backoff_s
        self.max_buffer_rows = max_buffer_rows
        self.pipeline = "default"
        self._ddl_lock = threading.Lock()  # lanes of one process create the table once
        # one COPY at a time per table and process: concurrent COPYs into one heap contend on
        # extending it (measured: 2 lanes at once were 2-3x slower per row than one after another)
        self.copy_lock = threading.Lock()

    def default_name(self) -> str:
        return self.table_name

    def describe(self) -> str:
        return f"postgres.table({self.schema_name}.{self.table_name}, mode={self.mode})"

    @property
    def dsn(self) -> str:
        return resolve_dsn(self._dsn_arg, self._password_file)

    def start(self, ctx: Any) -> None:
        self.pipeline = ctx.pipeline
        with_retries(self._create_progress_table, what=f"postgres {_safe_dsn(self.dsn)}",
                     retryable=_retryable(), retries=self.retries, backoff_s=self.retry_backoff_s)

    def _create_progress_table(self) -> None:
        with _connect(self.dsn) as conn, conn.cursor() as cur:
            cur.execute(f"create table if not exists {quote_ident(self.progress_table)} ("
                        "pipeline text not null, lane text not null, target text not null, "
                        "checkpoint_id text, first_offset bigint, high_offset bigint, rows bigint, "
                        "updated_at timestamptz not null default now(), primary key (pipeline, lane, target))")
            conn.commit()

    def for_lane(self, lane: str) -> Sink:
        return _PgLaneWriter(self, lane)

    def write(self, batch: Batch) -> None:
        raise ConfigError("postgres.table writes through per-lane writers; the runtime calls for_lane()")

    def flush(self, checkpoint_id: str) -> None:
        """Nothing is held by the shared object; each lane's writer commits its own rows."""

    # -- schema ---------------------------------------------------------------------------------
    def columns(self, cur: Any) -> list[tuple[str, str]]:
        """(name, type) of the target table's columns, in order; empty if it does not exist."""
        cur.execute("select a.attname, format_type(a.atttypid, a.atttypmod) from pg_attribute a "
                    f"where a.attrelid = to_regclass({quote_literal(self.qualified)}) and a.attnum > 0 "
                    "and not a.attisdropped order by a.attnum")
        return [(str(n), str(t)) for n, t in cur.fetchall()]

    def prepare(self, conn: Any, table: pa.Table) -> pa.Table:
        """Create the table if asked and missing; return the rows cast to its columns."""
        with conn.cursor() as cur:
            existing = self.columns(cur)
            if not existing:
                with self._ddl_lock:
                    existing = self.columns(cur)
                    if not existing:
                        existing = self._create_table(conn, cur, table.schema)
        try:
            return check_and_cast(table, existing, self.table)
        except SchemaMismatch:
            raise
        except Exception as exc:  # a cast pyarrow cannot do is a mismatch too
            raise SchemaMismatch(f"postgres table {self.table}: cannot convert the batch "
                                 f"({exc}); expected columns {existing}") from exc

    def _create_table(self, conn: Any, cur: Any, schema: pa.Schema) -> list[tuple[str, str]]:
        if not self.create:
            raise ConfigError(f"postgres table {self.table} does not exist; create it or pass create=True")
        missing = [k for k in self.key if k not in schema.names]
        if missing:
            raise ConfigError(f"postgres.table key {missing} not among the batch's columns {schema.names}")
        cols = [column_ddl(f) for f in schema]
        if self.key:
            cols.append(f"primary key ({', '.join(quote_ident(k) for k in self.key)})")
        cur.execute(f"create schema if not exists {quote_ident(self.schema_name)}")
        cur.execute(f"create table if not exists {self.qualified} ({', '.join(cols)})")
        conn.commit()
        log.info("table created", extra={"table": self.table, "columns": len(cols)})
        return self.columns(cur)


class _PgLaneWriter(LaneWriter):
    """One lane's connection: buffers filtered rows, commits them with the lane's progress."""

    def __init__(self, parent: PostgresTable, lane: str) -> None:
        super().__init__(lane, idempotent=parent.mode == "upsert", max_buffer_rows=parent.max_buffer_rows)
        self.parent = parent
        self._conn: Any = None
        self._resend = False  # True once the open transaction lost rows that were sent

    def _connection(self) -> Any:
        if self._conn is None:
            self._conn = _connect(self.parent.dsn)
        return self._conn

    def _drop_connection(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:  # a dead connection may fail to close; it is gone either way
                log.debug("closing a broken connection failed", extra={"lane": self.lane})
            self._conn = None

    def _retry(self, action: Any) -> Any:
        return with_retries(action, what=f"postgres {_safe_dsn(self.parent.dsn)} table {self.parent.table}",
                            retryable=_retryable(), retries=self.parent.retries,
                            backoff_s=self.parent.retry_backoff_s, on_retry=self._drop_connection)

    def _load(self) -> Progress:
        p = self.parent
        with self._connection().cursor() as cur:
            cur.execute(f"select checkpoint_id, high_offset from {quote_ident(p.progress_table)} "
                        f"where pipeline = {quote_literal(p.pipeline)} and lane = {quote_literal(self.lane)} "
                        f"and target = {quote_literal(p.table)}")
            row = cur.fetchone()
        self._conn.commit()
        return Progress(row[0], row[1]) if row else Progress()

    def _buffered(self, rows: pa.Table) -> None:
        if not self._resend:
            self._send_now(rows)

    def _send_now(self, table: pa.Table) -> None:
        """COPY a batch into the lane's open transaction, so COPY overlaps with reading."""
        conn = self._connection()
        try:
            self._send(conn, table)
        except _retryable() as exc:
            log.warning("write failed; the commit retries it", extra={"lane": self.lane,
                                                                       "error": type(exc).__name__})
            self._rollback(conn)
            self._drop_connection()
            self._resend = True
        except BaseException:
            self._rollback(conn)
            raise

    def _send(self, conn: Any, table: pa.Table) -> None:
        p = self.parent
        rows = p.prepare(conn, table)
        with p.copy_lock, conn.cursor() as cur:
            if p.mode == "append":
                cur.adbc_ingest(p.table_name, rows, mode="append", db_schema_name=p.schema_name)
            else:
                self._upsert(cur, rows)

    def _discard(self) -> None:
        if self._conn is not None:
            self._rollback(self._conn)
        self._resend = False

    def _store(self, pending: Pending, progress: Progress, checkpoint_id: str | None) -> None:
        self._retry(lambda: self._finish(pending, progress))
        self._resend = False

    def _finish(self, pending: Pending, progress: Progress) -> None:
        """Record the progress and commit; after a lost connection, send every row again first."""
        conn = self._connection()
        try:
            if self._resend:
                self._send(conn, pending.table())
            with conn.cursor() as cur:
                cur.execute(self._progress_sql(pending, progress))
            conn.commit()
        except BaseException:
            self._rollback(conn)
            self._resend = True  # the open transaction is gone with the rows sent in it
            raise

    def _rollback(self, conn: Any) -> None:
        try:
            conn.rollback()
        except Exception:  # the connection is broken; the retry reconnects
            self._drop_connection()

    def _upsert(self, cur: Any, rows: pa.Table) -> None:
        p = self.parent
        # a key twice in one statement is an error in Postgres: the later row wins, as in a replay
        rows = last_per_key(rows, p.key)
        stage = "_streamfn_stage"  # a temporary table: private to this lane's connection
        cur.adbc_ingest(stage, rows, mode="replace", temporary=True)
        cols = ", ".join(quote_ident(c) for c in rows.schema.names)
        keys = ", ".join(quote_ident(k) for k in p.key)
        updates = [f"{quote_ident(c)} = excluded.{quote_ident(c)}" for c in rows.schema.names if c not in p.key]
        action = f"do update set {', '.join(updates)}" if updates else "do nothing"
        try:
            cur.execute(f"insert into {p.qualified} ({cols}) select {cols} from {quote_ident(stage)} "
                        f"on conflict ({keys}) {action}")
        except import_optional("adbc_driver_manager", extra="postgres").ProgrammingError as exc:
            if "no unique or exclusion constraint" in str(exc):
                raise ConfigError(f"postgres table {p.table} has no unique index on {p.key}; upsert needs "
                                  "one (create the table with create=True, or add a primary key)") from exc
            raise

    def _progress_sql(self, pending: Pending, progress: Progress) -> str:
        p = self.parent

        def num(v: int | None) -> str:
            return "null" if v is None else str(int(v))

        cid = "null" if progress.checkpoint_id is None else quote_literal(progress.checkpoint_id)
        return (f"insert into {quote_ident(p.progress_table)} (pipeline, lane, target, checkpoint_id, "
                "first_offset, high_offset, rows, updated_at) values ("
                f"{quote_literal(p.pipeline)}, {quote_literal(self.lane)}, {quote_literal(p.table)}, {cid}, "
                f"{num(pending.first_offset)}, {num(progress.high_offset)}, {pending.rows}, now()) "
                "on conflict (pipeline, lane, target) do update set checkpoint_id = excluded.checkpoint_id, "
                "first_offset = excluded.first_offset, high_offset = excluded.high_offset, "
                "rows = excluded.rows, updated_at = excluded.updated_at")

    def close(self) -> None:
        self._drop_connection()


def table(table: str, *, dsn: str | None = None, mode: str = "append", key: list[str] | None = None,
          create: bool = True, password_file: str | None = None, progress_table: str = "streamfn_progress",
          retries: int = 5, retry_backoff_s: float = 0.5, max_buffer_rows: int = 1_000_000) -> PostgresTable:
    """A PostgreSQL table as an exactly-once sink (`mode="append"` or `"upsert"` on `key`).

    Args:
        dsn: a libpq URI, `env:VAR`, `file:PATH`; None reads $STREAMFN_POSTGRES_DSN or $DATABASE_URL.
            libpq's own variables (PGPASSWORD, PGPASSFILE) work too. The DSN is never logged.
        password_file: a file holding the password, added to the DSN.
        retries, retry_backoff_s: a commit that cannot reach the server is retried this often,
            waiting retry_backoff_s, then twice as long each time (at most 10 s), then fails.
    """
    return PostgresTable(table, dsn=dsn, mode=mode, key=key, create=create, password_file=password_file,
                         progress_table=progress_table, retries=retries, retry_backoff_s=retry_backoff_s,
                         max_buffer_rows=max_buffer_rows)


# -- bounded source ---------------------------------------------------------------------------------
class PostgresQuery(Source):
    """The rows of one query, as one partition (a backfill or a re-processing job)."""

    def __init__(self, sql: str, *, dsn: str | None, password_file: str | None, name: str) -> None:
        self.sql, self._dsn_arg, self._password_file, self._name = sql, dsn, password_file, name

    def default_name(self) -> str:
        return self._name

    def describe(self) -> str:
        return f"postgres.query({self.sql[:60]!r})"

    def partitions(self) -> list[str]:
        return ["0"]

    def open(self, partition: str, resume: Position) -> SourcePartition:
        conn = _connect(resolve_dsn(self._dsn_arg, self._password_file))
        cur = conn.cursor()
        try:
            cur.execute(self.sql)
            reader = cur.fetch_record_batch()
        except BaseException:
            conn.close()
            raise

        def close() -> None:
            cur.close()
            conn.close()
        return BatchesPartition(reader, resume, convert=plain_columns, on_close=close)


def query(sql: str, *, dsn: str | None = None, password_file: str | None = None,
          name: str = "postgres") -> PostgresQuery:
    """A bounded source: the rows of `sql` (give it an ORDER BY so a resumed read is the same)."""
    return PostgresQuery(sql, dsn=dsn, password_file=password_file, name=name)


__all__ = ["PostgresQuery", "PostgresTable", "query", "resolve_dsn", "table"]
