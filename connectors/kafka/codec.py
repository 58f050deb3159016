"""Message values <-> rows: JSON, CSV, Arrow IPC and raw bytes, a block of messages at a time."""
from __future__ import annotations

import io
import json
from collections.abc import Sequence

import polars as pl
import pyarrow as pa
import pyarrow.ipc as ipc

from streamfn.errors import ConfigError
from streamfn.schema import SchemaLock

FORMATS = ("json", "csv", "arrow", "raw")
# (index of the message in the block, why it was rejected)
Rejected = list[tuple[int, str]]


class Decoder:
    """Turns the values of a block of messages into one DataFrame and a list of rejects."""

    def __init__(self, fmt: str, schema: pl.Schema | None) -> None:
        self.fmt = fmt
        self.schema = SchemaLock(schema)

    def decode(self, values: list[bytes]) -> tuple[pl.DataFrame, Rejected, list[int] | None]:
        """Rows, rejected messages, and rows per message (None: one row per accepted message)."""
        if self.fmt == "raw":
            return pl.DataFrame({"value": pl.Series("value", values, dtype=pl.Binary)}), [], None
        if self.fmt == "arrow":
            return self._arrow(values)
        try:
            frame = self._parse(b"\n".join(values) + b"\n")
            if frame.height == len(values):
                return self._fit(frame), [], None
        except Exception:  # a bad value in the block: find it below, keep the rest
            pass
        return self._careful(values)

    def _parse(self, block: bytes) -> pl.DataFrame:
        schema = self.schema.get()
        if self.fmt == "json":
            return pl.read_ndjson(io.BytesIO(block), schema=schema)
        if schema is None:
            return pl.read_csv(io.BytesIO(block), has_header=False, infer_schema=False)
        return pl.read_csv(io.BytesIO(block), has_header=False, new_columns=list(schema),
                           schema=schema)

    def _fit(self, frame: pl.DataFrame) -> pl.DataFrame:
        if self.schema.get() is None:
            schema = self.schema.settle(frame.schema)
            return frame.select([pl.col(n).cast(t) for n, t in schema.items()])
        return frame

    def _careful(self, values: list[bytes]) -> tuple[pl.DataFrame, Rejected, None]:
        """Parse a block that failed as a whole: each bad value becomes a reject."""
        rejected: Rejected = []
        good: list[bytes] = []
        for i, value in enumerate(values):
            reason = self._check(value)
            if reason is None:
                good.append(_one_line(value) if self.fmt == "json" else value)
            else:
                rejected.append((i, reason))
        bad = {i for i, _ in rejected}
        kept = [i for i in range(len(values)) if i not in bad]
        frames: list[pl.DataFrame] = []
        try:
            frame = self._parse(b"\n".join(good) + b"\n") if good else None
            if frame is not None and frame.height == len(good):
                frames.append(self._fit(frame))
                good = []
        except Exception:  # some values do not fit the schema: go one by one
            pass
        for i, value in zip(kept, good):
            try:
                frames.append(self._fit(self._parse(value + b"\n")))
            except Exception as exc:
                rejected.append((i, f"value does not fit the schema: {str(exc).splitlines()[0]}"))
        rejected.sort()
        schema = self.schema.get()
        if not frames:
            return pl.DataFrame(schema=schema), rejected, None
        return pl.concat(frames, how="vertical_relaxed"), rejected, None

    def _check(self, value: bytes) -> str | None:
        if not value:
            return "empty message value (or a tombstone)"
        if self.fmt == "csv":
            return "a CSV value must be one line" if b"\n" in value.rstrip(b"\r\n") else None
        try:
            parsed = json.loads(value)
        except ValueError as exc:
            return f"malformed JSON: {exc}"
        if not isinstance(parsed, dict):
            return f"expected a JSON object, got {type(parsed).__name__}"
        return None

    def _arrow(self, values: list[bytes]) -> tuple[pl.DataFrame, Rejected, list[int]]:
        tables: list[pa.Table] = []
        rejected: Rejected = []
        rows: list[int] = []
        for i, value in enumerate(values):
            try:
                table = ipc.open_stream(pa.py_buffer(value)).read_all()
            except (pa.ArrowInvalid, OSError, TypeError) as exc:
                rejected.append((i, f"not an Arrow IPC stream: {str(exc).splitlines()[0]}"))
                continue
            tables.append(table)
            rows.append(table.num_rows)
        frames = [f for f in (pl.from_arrow(t, rechunk=False) for t in tables) if isinstance(f, pl.DataFrame)]
        schema = self.schema.get()
        if not frames:
            return pl.DataFrame(schema=schema), rejected, rows
        frame = frames[0] if len(frames) == 1 else pl.concat(frames, how="diagonal_relaxed")
        if schema is not None:
            frame = frame.select([(pl.col(n).cast(t) if n in frame.columns else pl.lit(None, t)).alias(n)
                                  for n, t in schema.items()])
        return frame, rejected, rows


def _one_line(value: bytes) -> bytes:
    """A JSON value on one line (pretty-printed values hold newlines that would split it)."""
    if b"\n" in value or b"\r" in value:
        return json.dumps(json.loads(value), separators=(",", ":")).encode()
    return value


# -- encoding (the sink) ---------------------------------------------------------------------
def encode_rows(fmt: str, frame: pl.DataFrame) -> list[bytes]:
    """One value per row: JSON objects, CSV lines (no header) or the raw `value` column."""
    if fmt == "json":
        return _split_lines(frame.write_ndjson().encode(), frame)
    if fmt == "csv":
        return _split_lines(frame.write_csv(include_header=False).encode(), frame)
    if "value" not in frame.columns:
        raise ConfigError(f"a raw Kafka sink writes the 'value' column; the rows have {frame.columns}")
    column = frame.get_column("value")
    if column.dtype == pl.String:
        return [v.encode() if v is not None else b"" for v in column.to_list()]
    if column.dtype != pl.Binary:
        raise ConfigError(f"a raw Kafka sink needs a 'value' column of bytes or text, got {column.dtype}")
    return [v if v is not None else b"" for v in column.to_list()]


def _split_lines(data: bytes, frame: pl.DataFrame) -> list[bytes]:
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    if len(lines) == frame.height:
        return lines
    # a CSV field held a newline (JSON lines never do): encode row by row, one message per row
    return [frame.slice(i, 1).write_csv(include_header=False).encode().rstrip(b"\n") for i in range(frame.height)]


def encode_arrow(frame: pl.DataFrame, max_bytes: int) -> list[bytes]:
    """Arrow IPC stream messages of at most `max_bytes` each (a batch, split by rows)."""
    table = frame.to_arrow()  # once: converting each slice costs as much as the whole frame
    out: list[bytes] = []
    start = 0
    rows: int = max(1, max_bytes // max(1, int(table.nbytes) // max(1, table.num_rows)))
    while start < table.num_rows:
        message = _ipc(table.slice(start, rows))
        if len(message) > max_bytes and rows > 1:  # the estimate was low: shrink and try again
            rows = max(1, int(rows * max_bytes / len(message) * 0.95))
            continue
        out.append(message)
        start += rows
    return out


def _ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()  # type: ignore[no-any-return]


def key_strings(frame: pl.DataFrame, key: str | None) -> Sequence[str | None] | None:
    """The message keys from the key column, as text (None: no key)."""
    if key is None:
        return None
    if key not in frame.columns:
        raise ConfigError(f"the Kafka sink's key column {key!r} is not among the rows' columns {frame.columns}")
    return frame.get_column(key).cast(pl.String).to_list()
