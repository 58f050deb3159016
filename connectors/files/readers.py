"""Reading one file as one partition: NDJSON, CSV, Parquet and Arrow IPC.

A partition's position is the number of records (lines, rows) already read, so a
reader opened at position N starts with record N.
"""
from __future__ import annotations

import io
import json
from typing import IO, Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from streamfn.connectors.files.schema import conform_text, conform_typed, infer_text_schema
from streamfn.batch import Position
from streamfn.contracts import Reject, SourcePartition
from streamfn.errors import EndOfInput
from streamfn.schema import SchemaLock

_BLOCK_BYTES = 8 << 20


class NdjsonPartition(SourcePartition):
    """Newline-delimited JSON, parsed a block at a time by polars; bad lines become rejects."""

    def __init__(self, stream: IO[bytes], schema: SchemaLock, resume: Position) -> None:
        self._stream = stream
        self._schema = schema
        self._line = 0  # lines consumed so far = the position
        self._buf = b""  # bytes read and not yet handed out start at self._start
        self._start = 0
        self._ends = np.empty(0, dtype=np.int64)  # newline offsets in self._buf
        self._next_end = 0  # the first of them not handed out
        self._eof = False
        self._rejects: list[Reject] = []
        self._skip(int(resume or 0))

    def _skip(self, lines: int) -> None:
        while self._line < lines:
            block = self._read_lines(lines - self._line)
            if block is None:
                return
            self._line += block[1]

    def _read_lines(self, max_lines: int) -> tuple[bytes, int] | None:
        """The next whole lines (at most max_lines) and their count; None at the end.

        Each byte is scanned for newlines once, when its chunk is read; a batch is then a
        slice between two known newline offsets.
        """
        while len(self._ends) - self._next_end < max_lines and not self._eof:
            chunk = self._stream.read(_BLOCK_BYTES)
            if not chunk:
                self._eof = True
                break
            rest = self._buf[self._start:]
            found = np.flatnonzero(np.frombuffer(chunk, dtype=np.uint8) == 10) + len(rest)
            self._ends = np.concatenate([self._ends[self._next_end:] - self._start, found])
            self._buf, self._start, self._next_end = rest + chunk, 0, 0
        available = len(self._ends) - self._next_end
        if available:
            count = min(max_lines, available)
            cut = int(self._ends[self._next_end + count - 1]) + 1
            block = self._buf[self._start:cut]
            self._start, self._next_end = cut, self._next_end + count
            return block, count
        if self._start < len(self._buf):  # a last line without a newline
            block = self._buf[self._start:] + b"\n"
            self._start = len(self._buf)
            return block, 1
        return None

    def next_batch(self, max_rows: int) -> pl.DataFrame | None:
        block = self._read_lines(max_rows)
        if block is None:
            raise EndOfInput()
        data, count = block
        first = self._line
        self._line += count
        schema = self._schema.get()
        try:
            frame = pl.read_ndjson(io.BytesIO(data), schema=schema)
        except Exception:
            return self._careful(data, first, schema)
        if schema is None:
            schema = self._schema.settle(frame.schema)
            frame = frame.select([pl.col(n).cast(t) for n, t in schema.items()])
        return frame

    def _careful(self, data: bytes, first: int, schema: pl.Schema | None) -> pl.DataFrame:
        """Parse a block that failed as a whole: each bad line becomes a reject."""
        good: list[bytes] = []
        offsets: list[int] = []
        for i, line in enumerate(data.split(b"\n")[:-1]):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except ValueError as exc:
                self._rejects.append(Reject(first + i, line, f"malformed JSON: {exc}"))
                continue
            if not isinstance(value, dict):
                self._rejects.append(Reject(first + i, line, f"expected a JSON object, got {type(value).__name__}"))
                continue
            good.append(line)
            offsets.append(first + i)
        if not good:
            return pl.DataFrame(schema=schema)
        joined = io.BytesIO(b"\n".join(good) + b"\n")
        if schema is None:
            schema = self._schema.settle(pl.read_ndjson(joined).schema)
            joined.seek(0)
        text = pl.read_ndjson(joined, schema={n: pl.String for n in schema})
        frame, bad, reasons = conform_text(text, schema)
        if bad is not None:
            for index, reason in zip(bad.arg_true().to_list(), reasons):
                self._rejects.append(Reject(offsets[index], good[index], reason))
        return frame

    def take_rejects(self) -> list[Reject]:
        rejects, self._rejects = self._rejects, []
        return rejects

    def position(self) -> Position:
        return self._line

    def close(self) -> None:
        self._stream.close()


class CsvPartition(SourcePartition):
    """CSV read by pyarrow's streaming reader as text, then parsed to the schema in bulk."""

    def __init__(self, stream: IO[bytes], schema: SchemaLock, resume: Position, *,
                 separator: str, has_header: bool, column_names: list[str] | None,
                 header: list[str], where: str) -> None:
        self._stream = stream
        self._where = where
        self._schema = schema
        self._row = int(resume or 0)  # data rows consumed, bad ones included
        self._rejects: list[Reject] = []
        self._pending: pl.DataFrame | None = None
        names = column_names or (header if has_header else [f"column_{i + 1}" for i in range(len(header))])

        def on_invalid(row: Any) -> str:
            self._rejects.append(Reject(None, row.text, f"CSV row has {row.actual_columns} columns, "
                                                         f"expected {row.expected_columns}"))
            return "skip"

        self._reader = pacsv.open_csv(
            stream,
            read_options=pacsv.ReadOptions(block_size=_BLOCK_BYTES, use_threads=False, column_names=names,
                                           skip_rows=1 if has_header else 0,
                                           skip_rows_after_names=self._row),
            parse_options=pacsv.ParseOptions(delimiter=separator, newlines_in_values=True,
                                             invalid_row_handler=on_invalid),
            convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in names},
                                                 strings_can_be_null=True, quoted_strings_can_be_null=False),
        )

    def next_batch(self, max_rows: int) -> pl.DataFrame | None:
        if self._pending is None or self._pending.height == 0:
            rejected = len(self._rejects)
            try:
                record_batch = self._reader.read_next_batch()
            except StopIteration:
                raise EndOfInput() from None
            except (pa.ArrowException, OSError) as exc:  # e.g. an unterminated quote: give up on the rest
                self._rejects.append(unreadable(self._where, self._row, exc))
                raise EndOfInput() from None
            text = pl.from_arrow(record_batch)
            assert isinstance(text, pl.DataFrame)
            self._row += len(self._rejects) - rejected  # rows pyarrow skipped as invalid
            self._pending = text
        text, self._pending = self._pending.slice(0, max_rows), self._pending.slice(max_rows)
        first = self._row
        self._row += text.height
        schema = self._schema.get() or self._schema.settle(infer_text_schema(text))
        frame, bad, reasons = conform_text(text, schema)
        if bad is not None:
            rows = text.filter(bad)
            for index, row, reason in zip(bad.arg_true().to_list(), rows.iter_rows(), reasons):
                payload = ",".join("" if v is None else str(v) for v in row)
                self._rejects.append(Reject(first + index, payload, reason))
        return frame

    def take_rejects(self) -> list[Reject]:
        rejects, self._rejects = self._rejects, []
        return rejects

    def position(self) -> Position:
        return self._row

    def close(self) -> None:
        self._stream.close()


class TablePartition(SourcePartition):
    """Parquet or Arrow IPC: typed record batches, sliced to max_rows."""

    def __init__(self, batches: Any, stream: IO[bytes], schema: SchemaLock, resume: Position, where: str) -> None:
        self._batches = batches  # an iterator of pa.RecordBatch
        self._stream = stream
        self._schema = schema
        self._where = where
        self._row = 0
        self._pending: pl.DataFrame | None = None
        self._rejects: list[Reject] = []
        skip = int(resume or 0)
        while self._row < skip:
            frame = self._next_frame()
            if frame is None:
                return
            take = min(frame.height, skip - self._row)
            self._row += take
            self._pending = frame.slice(take)

    def _next_frame(self) -> pl.DataFrame | None:
        if self._pending is not None and self._pending.height:
            frame, self._pending = self._pending, None
            return frame
        try:
            for record_batch in self._batches:
                if record_batch.num_rows:
                    frame = pl.from_arrow(record_batch)
                    assert isinstance(frame, pl.DataFrame)
                    return frame
        except (pa.ArrowException, OSError) as exc:  # a corrupt file: the rest of it is one bad record
            self._rejects.append(unreadable(self._where, self._row, exc))
        return None

    def take_rejects(self) -> list[Reject]:
        rejects, self._rejects = self._rejects, []
        return rejects

    def next_batch(self, max_rows: int) -> pl.DataFrame | None:
        frame = self._next_frame()
        if frame is None:
            raise EndOfInput()
        frame, rest = frame.slice(0, max_rows), frame.slice(max_rows)
        self._pending = rest if rest.height else None
        self._row += frame.height
        schema = self._schema.get()
        if schema is None:
            self._schema.settle(frame.schema)
            return frame
        return conform_typed(frame, schema, self._where)

    def position(self) -> Position:
        return self._row

    def close(self) -> None:
        self._stream.close()


def parquet_batches(stream: IO[bytes], batch_rows: int) -> Any:
    """The record batches of a Parquet file."""
    return pq.ParquetFile(stream).iter_batches(batch_size=batch_rows)


def arrow_batches(stream: IO[bytes]) -> Any:
    """The record batches of an Arrow IPC file (file or stream format)."""
    try:
        reader: Any = ipc.open_file(stream)
        return (reader.get_batch(i) for i in range(reader.num_record_batches))
    except pa.ArrowInvalid:
        stream.seek(0)
        return iter(ipc.open_stream(stream))


def unreadable(where: str, row: int, exc: BaseException) -> Reject:
    """A reject standing for the unreadable rest of a file (from record `row` on)."""
    return Reject(row, where, f"unreadable file from record {row} on: {type(exc).__name__}: {exc}")


class UnreadableFile(SourcePartition):
    """A file that could not even be opened as its format: one reject, then the end."""

    def __init__(self, where: str, exc: BaseException) -> None:
        self._rejects = [unreadable(where, 0, exc)]

    def next_batch(self, max_rows: int) -> pl.DataFrame | None:
        raise EndOfInput()

    def take_rejects(self) -> list[Reject]:
        rejects, self._rejects = self._rejects, []
        return rejects

    def position(self) -> Position:
        return 0
