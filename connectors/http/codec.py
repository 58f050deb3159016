"""Request bodies to rows, and rows back to response bodies, by content type."""
from __future__ import annotations

import io
import json
from collections.abc import Mapping
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.ipc as ipc

JSON = "json"        # one JSON object or an array of objects
NDJSON = "ndjson"    # one JSON object a line
CSV = "csv"
ARROW = "arrow"      # Arrow IPC, stream or file format

_KINDS = {
    "application/json": JSON, "text/json": JSON,
    "application/x-ndjson": NDJSON, "application/ndjson": NDJSON, "application/jsonl": NDJSON,
    "application/x-jsonlines": NDJSON, "application/jsonlines": NDJSON,
    "text/csv": CSV, "application/csv": CSV,
    "application/vnd.apache.arrow.stream": ARROW, "application/vnd.apache.arrow.file": ARROW,
    "application/x-arrow": ARROW,
}
CONTENT_TYPES = {JSON: "application/json", NDJSON: "application/x-ndjson", CSV: "text/csv",
                 ARROW: "application/vnd.apache.arrow.stream"}

Schema = Mapping[str, Any]  # column name -> polars data type


class BodyError(ValueError):
    """A request body that cannot become rows; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def body_kind(content_type: str | None) -> str:
    """The body format a Content-Type names (JSON when none is given)."""
    if not content_type:
        return JSON
    media = content_type.split(";", 1)[0].strip().lower()
    kind = _KINDS.get(media)
    if kind is None:
        if media.endswith("+json"):
            return JSON
        known = ", ".join(sorted(_KINDS))
        raise BodyError(415, f"unsupported content type {media!r}; send one of: {known}")
    return kind


def decode_rows(body: bytes) -> list[dict[str, Any]]:
    """A JSON object or array of objects as row dicts (cheap: the frame is built per micro-batch)."""
    try:
        value = json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise BodyError(400, f"malformed JSON body: {exc}") from None
    if isinstance(value, dict):
        return [value]
    if isinstance(value, list) and all(isinstance(v, dict) for v in value):
        return value
    got = type(value).__name__ if not isinstance(value, list) else "an array holding non-objects"
    raise BodyError(400, f"a JSON body must be an object or an array of objects, got {got}")


def decode_frame(body: bytes, kind: str) -> pl.DataFrame:
    """A non-JSON body (NDJSON, CSV, Arrow IPC) as a DataFrame."""
    try:
        if kind == NDJSON:
            return pl.read_ndjson(io.BytesIO(body)) if body.strip() else pl.DataFrame()
        if kind == CSV:
            return pl.read_csv(io.BytesIO(body))
        if kind == ARROW:
            return _read_arrow(body)
    except BodyError:
        raise
    except Exception as exc:  # polars/pyarrow raise many types for bad input; all mean "malformed"
        raise BodyError(400, f"malformed {kind} body: {_first_line(exc)}") from None
    raise BodyError(415, f"cannot read a {kind} body as rows")


def _read_arrow(body: bytes) -> pl.DataFrame:
    buffer = pa.py_buffer(body)
    try:
        table = ipc.open_stream(buffer).read_all()
    except pa.ArrowInvalid:
        table = ipc.open_file(buffer).read_all()
    frame = pl.from_arrow(table, rechunk=False)
    assert isinstance(frame, pl.DataFrame)
    return frame


def conform(frame: pl.DataFrame, schema: Schema | None) -> pl.DataFrame:
    """Check and cast a request's rows to the endpoint's schema (422 with the reason if they differ)."""
    if schema is None:
        return frame
    missing = [name for name in schema if name not in frame.columns]
    if missing and frame.height:
        raise BodyError(422, f"schema mismatch: missing column(s) {', '.join(map(repr, missing))}; "
                             f"expected {_describe(schema)}")
    casts = []
    for name, dtype in schema.items():
        if name in frame.columns:
            casts.append(pl.col(name).cast(dtype, strict=True))
        else:
            casts.append(pl.lit(None, dtype=dtype).alias(name))
    try:
        return frame.with_columns(casts)
    except Exception as exc:  # a value that does not fit its column's type
        raise BodyError(422, f"schema mismatch: {_first_line(exc)}; expected {_describe(schema)}") from None


def rows_frame(rows: list[dict[str, Any]], schema: Schema | None) -> pl.DataFrame:
    """Row dicts as a DataFrame, typed by the schema when there is one."""
    try:
        frame = pl.from_dicts(rows, infer_schema_length=None) if rows else pl.DataFrame()
    except Exception as exc:  # e.g. a column holding both numbers and text
        raise BodyError(422, f"rows do not fit one table: {_first_line(exc)}") from None
    return conform(frame, schema)


def encode(frame: pl.DataFrame, kind: str, *, single: bool) -> tuple[bytes, str]:
    """Rows as a response body in the request's format; `single`: answer one object, not an array."""
    if kind == CSV:
        return frame.write_csv().encode(), CONTENT_TYPES[CSV]
    if kind == ARROW:
        sink = io.BytesIO()
        with ipc.new_stream(sink, frame.to_arrow().schema) as writer:
            writer.write_table(frame.to_arrow())
        return sink.getvalue(), CONTENT_TYPES[ARROW]
    rows = frame.to_dicts()
    if kind == NDJSON:
        return "".join(json.dumps(r, default=str) + "\n" for r in rows).encode(), CONTENT_TYPES[NDJSON]
    return encode_json(rows, single=single), CONTENT_TYPES[JSON]


def encode_json(rows: list[dict[str, Any]], *, single: bool) -> bytes:
    """Rows as a JSON array, or one object when the request sent one object and one row came out."""
    value: Any = rows[0] if single and len(rows) == 1 else rows
    return json.dumps(value, default=str, separators=(",", ":")).encode()


def _describe(schema: Schema) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in schema.items()) + "}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"
