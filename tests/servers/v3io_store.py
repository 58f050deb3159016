"""The storage behind the v3io-frames test double (tests/servers/v3io.py): KV, TSDB and stream tables
kept in memory, read and written as frames_pb2.Frame messages, as framesd's backends do.

What it models (after framesd's kv/tsdb/stream backends):
- kv: items keyed by the write's index column; save modes createNewItemsOnly / updateItem /
  overwriteItem / overwriteTable; reads return the key as the frame's index, missing attributes
  as nulls (null_values), `columns` projection, `message_limit` rows per frame (default 256),
  items in key order.
- tsdb: tables made with `create(rate=...)`; the first index is the sample time, further string
  indices and Frame.labels are labels, columns are numeric metrics stored as floats; reads filter
  on start/end (epoch ms) and project metric columns.
- stream: `create(shards=, retention_hours=)`; each written row becomes a JSON record on the next
  shard (round robin), sequence numbers from 1 per shard; reads need seek (earliest | latest |
  seq | time) and shard_id, and return the JSON fields (numbers as floats), `stream_time` and the
  index `seq_number`, `message_limit` rows per frame (default 1024), up to the shard's end;
  a record that is not JSON comes back as a `raw_data` column.
What it does not: filter expressions, SQL queries, TSDB aggregation, conditions and update
expressions, partition keys, retention, the history API.
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from v3io_frames import frames_pb2 as fpb

VERSION = "0.13.13"
_KV_LIMIT, _STREAM_LIMIT = 256, 1024


class FramesError(Exception):
    """A request the double (like framesd) refuses; the text goes back to the client."""


# -- Frame <-> rows -------------------------------------------------------------------------------
def _values(col: fpb.Column) -> list[Any]:
    kind = {fpb.INTEGER: "ints", fpb.FLOAT: "floats", fpb.STRING: "strings", fpb.TIME: "times",
            fpb.BOOLEAN: "bools"}.get(col.dtype)
    if col.dtype == fpb.NULL:
        return [None] * col.size
    if kind is None:
        raise FramesError(f"column {col.name!r}: unknown dtype {col.dtype}")
    values = list(getattr(col, kind))
    if col.kind == fpb.Column.LABEL:
        return values[:1] * col.size
    return values


def frame_rows(frame: fpb.Frame) -> tuple[list[str], list[dict[str, Any]], dict[str, int]]:
    """(index names, rows, dtype per column) of a written frame; nulls become None."""
    cols = list(frame.indices) + list(frame.columns)
    data = {c.name: _values(c) for c in cols}
    n = max((len(v) for v in data.values()), default=0)
    rows = [{name: values[i] if i < len(values) else None for name, values in data.items()} for i in range(n)]
    for i, mask in enumerate(frame.null_values):
        for name, is_null in mask.nullColumns.items():
            if is_null and i < n:
                rows[i][name] = None
    return [c.name for c in frame.indices], rows, {c.name: c.dtype for c in cols}


def make_frame(index: tuple[str, int] | None, columns: list[tuple[str, int]], rows: list[dict[str, Any]],
               labels: dict[str, Any] | None = None) -> fpb.Frame:
    """A Frame of these rows; None values are sent as empty values plus a null mask."""
    empty = {fpb.INTEGER: 0, fpb.FLOAT: 0.0, fpb.STRING: "", fpb.TIME: 0, fpb.BOOLEAN: False}
    key = {fpb.INTEGER: "ints", fpb.FLOAT: "floats", fpb.STRING: "strings", fpb.TIME: "times", fpb.BOOLEAN: "bools"}

    def column(name: str, dtype: int) -> fpb.Column:
        values = [empty[dtype] if r.get(name) is None else r[name] for r in rows]
        return fpb.Column(kind=fpb.Column.SLICE, name=name, dtype=dtype, size=len(rows), **{key[dtype]: values})

    nulls = [fpb.NullValuesMap(nullColumns={n: True for n, _ in columns if r.get(n) is None}) for r in rows]
    frame = fpb.Frame(columns=[column(n, d) for n, d in columns],
                      indices=[column(*index)] if index else [],
                      null_values=nulls if any(m.nullColumns for m in nulls) else [])
    for name, value in (labels or {}).items():
        frame.labels[name].CopyFrom(fpb.Value(ival=value) if isinstance(value, int) else fpb.Value(sval=str(value)))
    return frame


def chunks(rows: list[Any], size: int) -> list[list[Any]]:
    """Rows cut into messages of at most `size`."""
    return [rows[i:i + size] for i in range(0, len(rows), size)] or []


# -- tables ---------------------------------------------------------------------------------------
@dataclass
class KVTable:
    key: str = ""
    key_dtype: int = fpb.STRING
    fields: dict[str, int] = field(default_factory=dict)
    items: dict[Any, dict[str, Any]] = field(default_factory=dict)


@dataclass
class TSDBTable:
    rate: str
    samples: list[tuple[int, tuple[tuple[str, str], ...], dict[str, float]]] = field(default_factory=list)


@dataclass
class StreamTable:
    shards: list[list[tuple[int, int, bytes]]]
    retention_hours: int
    next_shard: int = 0


class FramesStore:
    """Tables per (container, backend, name); every method is one framesd request."""

    def __init__(self, access_key: str | None = None) -> None:
        self.access_key = access_key
        self.tables: dict[tuple[str, str, str], Any] = {}
        self.requests: list[tuple[str, str, str]] = []  # (action, backend, table), for tests
        self._lock = threading.Lock()

    def _where(self, action: str, session: dict[str, Any], backend: str, table: str) -> tuple[str, str, str]:
        if self.access_key is not None and session.get("token") != self.access_key:
            raise FramesError("unauthorized: the session's access key (token) is missing or wrong")
        container = session.get("container") or ""
        if not container:
            raise FramesError("missing container in the session")
        if backend not in ("kv", "tsdb", "stream"):
            raise FramesError(f"unknown backend {backend!r} (the test double has kv, tsdb and stream)")
        if not table:
            raise FramesError("empty table")
        self.requests.append((action, backend, table))
        return container, backend, table.strip("/")

    def create(self, session: dict[str, Any], backend: str, table: str, if_exists: int, kw: dict[str, Any]) -> None:
        with self._lock:
            where = self._where("create", session, backend, table)
            if where in self.tables:
                if if_exists == fpb.IGNORE:
                    return
                raise FramesError(f"table {table!r} already exists")
            if backend == "tsdb":
                if not kw.get("rate"):
                    raise FramesError("missing rate for a tsdb table (e.g. rate='1/s')")
                self.tables[where] = TSDBTable(kw["rate"])
            elif backend == "stream":
                shards = int(kw.get("shards") or 0)
                if shards < 1:
                    raise FramesError("a stream needs shards >= 1")
                self.tables[where] = StreamTable([[] for _ in range(shards)], int(kw.get("retention_hours") or 24))
            else:
                raise FramesError("kv tables are created by their first write")

    def delete(self, session: dict[str, Any], backend: str, table: str, if_missing: int, filter: str) -> None:
        with self._lock:
            where = self._where("delete", session, backend, table)
            if filter:
                raise FramesError("delete with a filter is not supported by the test double")
            if self.tables.pop(where, None) is None and if_missing != fpb.IGNORE:
                raise FramesError(f"table {table!r} not found")

    def write(self, request: fpb.InitialWriteRequest, frames: list[fpb.Frame]) -> tuple[int, int]:
        session = {f.name: v for f, v in request.session.ListFields()}
        with self._lock:
            where = self._where("write", session, request.backend, request.table)
            rows = 0
            for frame in frames:
                index, data, dtypes = frame_rows(frame)
                labels = {k: _pb_value(v) for k, v in frame.labels.items()}
                if request.backend == "kv":
                    self._write_kv(where, request.save_mode, index, data, dtypes)
                elif request.backend == "tsdb":
                    self._write_tsdb(where, index, data, dtypes, labels)
                else:
                    self._write_stream(where, data, dtypes)
                rows += len(data)
            return len(frames), rows

    def _write_kv(self, where: Any, mode: str, index: list[str], rows: list[dict[str, Any]],
                  dtypes: dict[str, int]) -> None:
        if len(index) != 1:
            raise FramesError("a kv write needs exactly one index column: the item key")
        if mode == "overwriteTable":
            self.tables.pop(where, None)
        table = self.tables.setdefault(where, KVTable(index[0], dtypes[index[0]]))
        if table.key != index[0]:
            raise FramesError(f"the table's key is {table.key!r}, not {index[0]!r}")
        for name, dtype in dtypes.items():
            if name == table.key or dtype == fpb.NULL:
                continue
            if table.fields.setdefault(name, dtype) != dtype:
                raise FramesError(f"column {name!r}: type {dtype} differs from the table's {table.fields[name]}")
        for row in rows:
            key = row[table.key]
            attrs = {k: v for k, v in row.items() if k != table.key and v is not None}
            if key in table.items and mode in ("", "createNewItemsOnly"):
                raise FramesError(f"item {key!r} already exists (save_mode createNewItemsOnly)")
            if mode == "updateItem" and key in table.items:
                table.items[key].update(attrs)
            else:
                table.items[key] = attrs

    def _write_tsdb(self, where: Any, index: list[str], rows: list[dict[str, Any]], dtypes: dict[str, int],
                    labels: dict[str, Any]) -> None:
        table = self.tables.get(where)
        if not isinstance(table, TSDBTable):
            raise FramesError(f"tsdb table {where[2]!r} not found; create it first")
        if not index or dtypes[index[0]] != fpb.TIME:
            raise FramesError("a tsdb write needs the sample time as its first index column")
        metrics = [n for n in dtypes if n not in index]
        for name in metrics:
            if dtypes[name] not in (fpb.INTEGER, fpb.FLOAT):
                raise FramesError(f"tsdb metric {name!r} must be numeric")
        for row in rows:
            series = tuple(sorted({**{k: str(v) for k, v in labels.items()},
                                   **{n: str(row[n]) for n in index[1:]}}.items()))
            table.samples.append((row[index[0]], series, {m: float(row[m]) for m in metrics if row[m] is not None}))

    def _write_stream(self, where: Any, rows: list[dict[str, Any]], dtypes: dict[str, int]) -> None:
        table = self.tables.get(where)
        if not isinstance(table, StreamTable):
            raise FramesError(f"stream {where[2]!r} not found; create it first")
        for row in rows:
            record = {k: _go_time(v) if dtypes[k] == fpb.TIME and v is not None else v for k, v in row.items()}
            shard = table.shards[table.next_shard]
            table.next_shard = (table.next_shard + 1) % len(table.shards)
            shard.append((len(shard) + 1, time.time_ns(), json.dumps(record).encode()))

    def put_record(self, session: dict[str, Any], table: str, shard: int, data: bytes) -> int:
        """Append raw bytes to one shard (what any v3io producer can do); returns the sequence number."""
        with self._lock:
            stream = self.tables[self._where("put", session, "stream", table)]
            records = stream.shards[shard]
            records.append((len(records) + 1, time.time_ns(), data))
            return len(records)

    def read(self, req: dict[str, Any]) -> list[fpb.Frame]:
        with self._lock:
            where = self._where("read", req.get("session") or {}, req.get("backend", ""), req.get("table", ""))
            if req.get("filter") or req.get("query"):
                raise FramesError("filter and query are not supported by the test double")
            table = self.tables.get(where)
            if table is None:
                raise FramesError(f"table {req.get('table')!r} not found")
            limit = int(req.get("message_limit") or 0)
            if isinstance(table, KVTable):
                return self._read_kv(table, req.get("columns") or [], limit or _KV_LIMIT)
            if isinstance(table, TSDBTable):
                return self._read_tsdb(table, req, limit or _KV_LIMIT)
            return self._read_stream(table, req, limit or _STREAM_LIMIT)

    def _read_kv(self, table: KVTable, columns: list[str], limit: int) -> list[fpb.Frame]:
        names = [c for c in table.fields if not columns or c in columns]
        rows = [{table.key: k, **v} for k, v in sorted(table.items.items())]
        index = (table.key, table.key_dtype) if not columns or table.key in columns else None
        return [make_frame(index, [(n, table.fields[n]) for n in names], part) for part in chunks(rows, limit)]

    def _read_tsdb(self, table: TSDBTable, req: dict[str, Any], limit: int) -> list[fpb.Frame]:
        start, end = _ms(req.get("start"), 0), _ms(req.get("end"), 2**62 // 10**6)
        samples = sorted((s for s in table.samples if start * 10**6 <= s[0] <= end * 10**6), key=lambda s: (s[1], s[0]))
        label_names = sorted({k for _, series, _ in samples for k, _ in series})
        metrics = sorted({m for _, _, values in samples for m in values})
        if req.get("columns"):
            metrics = [m for m in metrics if m in req["columns"]]
        rows = [{"time": t, **dict(series), **values} for t, series, values in samples]
        cols = [(n, fpb.STRING) for n in label_names] + [(m, fpb.FLOAT) for m in metrics]
        return [make_frame(("time", fpb.TIME), cols, part) for part in chunks(rows, limit)]

    def _read_stream(self, table: StreamTable, req: dict[str, Any], limit: int) -> list[fpb.Frame]:
        seek, shard_id = str(req.get("seek") or "").lower(), str(req.get("shard_id") or "")
        if not seek or not shard_id:
            raise FramesError("missing essential paramaters, need: table, seek, shard parameters")
        if not shard_id.isdigit() or int(shard_id) >= len(table.shards):
            raise FramesError(f"shard {shard_id} does not exist (the stream has {len(table.shards)})")
        records = table.shards[int(shard_id)]
        if seek == "earliest":
            first = 1
        elif seek in ("latest", "late"):
            first = len(records) + 1
        elif seek in ("seq", "sequence"):
            first = int(req.get("sequence") or 0)
        elif seek == "time":
            start_ns = _ms(req.get("start"), 0) * 10**6
            first = next((seq for seq, at, _ in records if at >= start_ns), len(records) + 1)
        else:
            raise FramesError(f"Stream seek type {seek} is invalid, use time | seq | latest | earliest")
        frames = []
        for part in chunks([r for r in records if r[0] >= first], limit):
            frames.append(_stream_frame(part))
        return frames


def _stream_frame(records: list[tuple[int, int, bytes]]) -> fpb.Frame:
    rows: list[dict[str, Any]] = []
    for seq, at, data in records:
        try:
            row = json.loads(data)
            if not isinstance(row, dict):
                raise ValueError("not an object")
        except ValueError:
            row = {"raw_data": data.decode(errors="replace")}
        rows.append({**{k: float(v) if isinstance(v, int) and not isinstance(v, bool) else v for k, v in row.items()},
                     "stream_time": at, "seq_number": seq})
    dtypes: dict[str, int] = {}
    for row in rows:
        for name, value in row.items():
            if value is None or name in ("stream_time", "seq_number"):
                continue
            dtype = fpb.BOOLEAN if isinstance(value, bool) else fpb.FLOAT if isinstance(value, float) else fpb.STRING
            if isinstance(value, (dict, list)):
                raise FramesError(f"field {name!r} holds a {type(value).__name__}; frames cannot make a column of it")
            if dtypes.setdefault(name, dtype) != dtype:
                return fpb.Frame(error=f"Failed to create frame - column {name!r} has mixed types")
    columns = [(n, d) for n, d in dtypes.items()] + [("stream_time", fpb.TIME)]
    return make_frame(("seq_number", fpb.INTEGER), columns, rows, {"last_seq": records[-1][0]})


def _pb_value(value: fpb.Value) -> Any:
    return getattr(value, value.WhichOneof("value")) if value.WhichOneof("value") else None


def _go_time(ns: int) -> str:
    """A time as Go's json.Marshal writes it (RFC 3339, nanoseconds, UTC)."""
    stamp = datetime.fromtimestamp(ns // 10**9, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{stamp}.{ns % 10**9:09d}Z"


def _ms(value: Any, default: int) -> int:
    if value in (None, "", "0"):
        return default
    if str(value) == "now":
        return time.time_ns() // 10**6
    try:
        return int(value)
    except ValueError:
        raise FramesError(f"time {value!r}: the test double takes epoch milliseconds, '0' or 'now'") from None
