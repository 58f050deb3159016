"""v3io streams: a sink that appends rows as JSON records, a source with one lane per shard.

A shard's position is the sequence number of the next record to read; it is saved in streamfn's
checkpoints like a Kafka offset, and a resumed lane seeks there (`seek="seq"`).
"""
from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

import polars as pl
import pyarrow as pa

from streamfn.batch import Batch, Position
from streamfn.contracts import Reject, Source, SourcePartition
from streamfn.errors import ConfigError, EndOfInput
from streamfn.connectors.v3io._base import V3ioSink
from streamfn.connectors.v3io._conn import Connection, frames_module, ignore_if_exists
from streamfn.connectors.v3io.convert import frame_to_arrow, to_pandas

SEEKS = ("earliest", "latest")
_META = ("seq_number", "stream_time")
_MSG_ROWS = 10_000


class V3ioStream(V3ioSink, Source):
    """A v3io stream: records in, or one lane per shard out."""

    backend = "stream"

    def __init__(self, path: str, conn: Connection, *, shards: int | None, seek: str, schema: Mapping[str, Any] | None,
                 create: bool, retention_hours: int, metadata: bool, poll_interval_s: float) -> None:
        super().__init__(path, conn)
        if seek not in SEEKS:
            raise ConfigError(f"v3io.stream seek must be 'earliest' or 'latest', got {seek!r}")
        if shards is not None and shards < 1:
            raise ConfigError(f"v3io.stream shards must be at least 1, got {shards}")
        self.shards, self.seek, self.schema = shards, seek, dict(schema or {})
        self.create, self.retention_hours, self.metadata = create, retention_hours, metadata
        self.poll_interval_s = poll_interval_s

    def on_start(self, client: Any) -> None:
        if self.create:
            client.create("stream", self.table, shards=self.shards or 1, retention_hours=self.retention_hours,
                          if_exists=ignore_if_exists())

    # -- sink ------------------------------------------------------------------------------------
    def write_with(self, client: Any, batch: Batch) -> None:
        if batch.frame.height:
            client.write("stream", self.table, to_pandas(batch.frame, self.describe()))

    # -- source ----------------------------------------------------------------------------------
    def partitions(self) -> Sequence[str]:
        if self.shards is None:
            raise ConfigError(f"{self.describe()} as a source needs shards=N (the stream's shard count): "
                              "one lane reads each shard")
        return [str(i) for i in range(self.shards)]

    def open(self, partition: str, resume: Position) -> SourcePartition:
        return _ShardReader(self, partition, None if resume is None else int(resume))


class _ShardReader(SourcePartition):
    """Reads one shard from a sequence number; returns at most max_rows rows per call."""

    def __init__(self, stream: V3ioStream, shard: str, next_seq: int | None) -> None:
        self.stream, self.shard, self.next_seq = stream, shard, next_seq
        self._rejects: list[Reject] = []
        self._last_empty = 0.0

    def next_batch(self, max_rows: int) -> pa.Table | None:
        if time.monotonic() - self._last_empty < self.stream.poll_interval_s:
            return None  # polled a moment ago and found nothing: don't hammer framesd
        read_error = frames_module().ReadError
        try:
            tables = self._read(max_rows, min(max_rows, _MSG_ROWS))
        except read_error as exc:  # a message framesd cannot build (e.g. a field of mixed types)
            tables = self._read_one_by_one(max_rows, exc, read_error)
        if not tables:
            ctx = self.stream.ctx
            if ctx is not None and ctx.until_idle and not self._rejects:
                raise EndOfInput()
            self._last_empty = time.monotonic()
            return None
        self._last_empty = 0.0
        # decode message by message: each has its own JSON-inferred types
        frames = [self._decode(pl.from_arrow(t)) for t in tables]  # type: ignore[arg-type]
        return pl.concat(frames, how="diagonal_relaxed").to_arrow()

    def _read(self, max_rows: int, per_message: int) -> list[pa.Table]:
        """Up to max_rows rows from next_seq; an error after some rows just ends this read."""
        seek: dict[str, Any] = ({"seek": "seq", "sequence": self.next_seq} if self.next_seq is not None
                                else {"seek": self.stream.seek})
        frames = self.stream.client().read("stream", self.stream.table, shard_id=self.shard, iterator=True,
                                           get_raw=True, max_rows_in_msg=per_message, **seek)
        tables: list[pa.Table] = []
        rows = 0
        try:
            for raw in frames:
                table = frame_to_arrow(raw.raw_frame)
                if not table.num_rows:
                    continue
                table = table.slice(0, max_rows - rows)
                tables.append(table)
                rows += table.num_rows
                self.next_seq = int(table.column("seq_number")[-1].as_py()) + 1
                if rows >= max_rows:
                    break
        except Exception:
            if not tables:
                raise
        return tables

    def _read_one_by_one(self, max_rows: int, first: Exception, read_error: type[Exception]) -> list[pa.Table]:
        """Isolate the record framesd cannot decode: it becomes a reject, the others are read."""
        tables: list[pa.Table] = []
        if self.next_seq is None:  # learn where the shard starts from its first record
            tables = self._read(1, 1)
            if self.next_seq is None:
                raise first
        for _ in range(min(max_rows, _MSG_ROWS)):
            try:
                one = self._read(1, 1)
            except read_error as exc:
                self._rejects.append(Reject(self.next_seq, "", f"framesd cannot read this record: {exc}"))
                self.next_seq += 1
                continue
            if not one:
                break
            tables.extend(one)
        return tables

    def _decode(self, frame: pl.DataFrame) -> pl.DataFrame:
        """Non-JSON records become rejects; schema= casts the JSON types (numbers come as floats)."""
        if "raw_data" in frame.columns:
            raw = frame["raw_data"].is_not_null()
            for seq, payload in frame.filter(raw).select("seq_number", "raw_data").iter_rows():
                self._rejects.append(Reject(int(seq), payload, "v3io stream record is not a JSON object"))
            frame = frame.filter(~raw).drop("raw_data")
        bad = pl.Series([False] * frame.height, dtype=pl.Boolean)
        for name, dtype in self.stream.schema.items():
            if name not in frame.columns:
                frame = frame.with_columns(pl.lit(None, dtype=dtype).alias(name))
                continue
            col = frame[name]
            if isinstance(dtype, pl.Datetime) or dtype == pl.Datetime:
                cast = col.cast(pl.String).str.to_datetime(time_zone="UTC", strict=False)
                cast = cast.dt.replace_time_zone(None) if getattr(dtype, "time_zone", None) is None else cast
            else:
                cast = col.cast(dtype, strict=False)
            failed = cast.is_null() & col.is_not_null()
            if failed.any():
                for seq, value in frame.filter(failed).select("seq_number", name).iter_rows():
                    self._rejects.append(Reject(int(seq), json.dumps({name: value}),
                                                f"field {name!r}: cannot convert {value!r} to {dtype}"))
                bad = bad | failed
            frame = frame.with_columns(cast.alias(name))
        frame = frame.filter(~bad)
        return frame if self.stream.metadata else frame.drop([c for c in _META if c in frame.columns])

    def take_rejects(self) -> list[Reject]:
        rejects, self._rejects = self._rejects, []
        return rejects

    def position(self) -> Position:
        return self.next_seq
