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
_COUNT_STEP = 1 << 18


def _newlines(buf: bytearray, start: int, end: int) -> int:
    """The number of newlines in buf[start:end].

    numpy is ~3x bytearray.count; 256 KiB steps keep its temporary mask small and cached.
    """
    data = np.frombuffer(buf, dtype=np.uint8, count=end - start, offset=start)
    return sum(int(np.count_nonzero(data[i:i + _COUNT_STEP] == 10)) for i in range(0, len(data), _COUNT_STEP))


class NdjsonPartition(SourcePartition):
    """Newline-delimited JSON, parsed a block at a time by polars; bad lines become rejects."""

    def __init__(self, stream: IO[bytes], schema: SchemaLock, resume: Position) -> None:
        self._stream = stream
        self._schema = schema
        self._line = 0  # lines consumed so far = the position
        # one buffer reused for every read (no fresh pages per batch): bytes not yet handed out
        # are self._buf[self._start:self._end], and hold self._held newlines
        self._buf = bytearray()
        self._start = self._end = self._held = 0
        self._line_bytes = 0.0  # mean bytes per line of the first read: sizes the next ones
        self._readinto = getattr(stream, "readinto", None)
        self._eof = False
        self._rejects: list[Reject] = []
        self._skip(int(resume or 0))

    def _skip(self, lines: int) -> None:
        while self._line < lines:  # in bounded steps, so a far resume holds one step in memory
            block = self._read_lines(min(lines - self._line, 1 << 17))
            if block is None:
                return
            self._line += block[1]

    def _read_lines(self, max_lines: int) -> tuple[bytes, int] | None:
        """The next whole lines (at most max_lines) and their count; None at the end.

        Reads are sized from the mean line length so that one read usually holds a whole
        batch; each byte is read into the reused buffer, counted once, and copied once into
        the block handed to the parser. The batch's end is found from the estimate.
        """
        while self._held < max_lines and not self._eof:
            self._fill(self._read_size(max_lines - self._held))
        if self._held:
            count = min(max_lines, self._held)
            if count == self._held:
                cut = self._buf.rindex(b"\n", self._start, self._end) + 1
            else:
                cut = self._cut_after(count)
            block = bytes(memoryview(self._buf)[self._start:cut])
            self._start, self._held = cut, self._held - count
            return block, count
        if self._start < self._end:  # a last line without a newline
            block = bytes(memoryview(self._buf)[self._start:self._end]) + b"\n"
            self._start = self._end
            return block, 1
        return None

    def _fill(self, size: int) -> None:
        """Read up to size more bytes behind those not handed out yet."""
        keep = self._end - self._start
        if keep + size > len(self._buf):  # grow, with room for the next reads' varying sizes
            grown = bytearray(int((keep + size) * 1.25))
            grown[:keep] = memoryview(self._buf)[self._start:self._end]
            self._buf = grown
        elif self._start:  # via a copy: the two ranges may overlap (bytearray copies with memcpy)
            self._buf[:keep] = self._buf[self._start:self._end]
        self._start, self._end = 0, keep
        n = self._read_at(keep, size)
        if not n:
            self._eof = True
            return
        found = _newlines(self._buf, keep, keep + n)
        if found and not self._line_bytes:
            self._line_bytes = n / found
        self._end, self._held = keep + n, self._held + found

    def _read_at(self, offset: int, size: int) -> int:
        """Read up to size bytes into the buffer at offset; how many came (0: the end)."""
        if self._readinto is not None:
            try:
                with memoryview(self._buf) as view:
                    return self._readinto(view[offset:offset + size]) or 0
            except (NotImplementedError, io.UnsupportedOperation):  # a stream that only reads
                self._readinto = None
        chunk = self._stream.read(size)
        self._buf[offset:offset + len(chunk)] = chunk
        return len(chunk)

    def _read_size(self, lines: int) -> int:
        if not self._line_bytes:
            return _BLOCK_BYTES
        return min(max(int(lines * self._line_bytes * 1.02) + 4096, 1 << 16), 8 * _BLOCK_BYTES)

    def _cut_after(self, count: int) -> int:
        """The offset just past the count-th newline from self._start (the buffer holds more)."""
        buf, start = self._buf, self._start
        end = min(self._end, start + int(count * (self._line_bytes or 1.0)))
        seen = self._held - _newlines(buf, end, self._end)  # the tail past the estimate is short
        if abs(seen - count) > 1024:  # the estimate is far off: index every newline
            ends = np.flatnonzero(np.frombuffer(buf, dtype=np.uint8, count=self._end - start, offset=start) == 10)
            return start + int(ends[count - 1]) + 1
        while seen < count:
            end = buf.index(b"\n", end) + 1
            seen += 1
        while seen > count:
            end = buf.rindex(b"\n", start, end)
            seen -= 1
        return buf.rindex(b"\n", start, end) + 1

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
