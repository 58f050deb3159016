"""v3io KV tables (sink: upsert by key; source: read the table) and TSDB tables (sink)."""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import polars as pl
import pyarrow as pa

from streamfn.batch import Batch, Position
from streamfn.contracts import Source, SourcePartition
from streamfn.errors import ConfigError, EndOfInput
from streamfn.connectors.v3io._base import V3ioSink
from streamfn.connectors.v3io._conn import Connection, ignore_if_exists
from streamfn.connectors.v3io.convert import frame_to_arrow, to_pandas

SAVE_MODES = ("updateItem", "overwriteItem", "createNewItemsOnly", "overwriteTable")


class KVTable(V3ioSink, Source):
    """A v3io KV (NoSQL) table: a sink that upserts rows by `key`, or a source that reads every item."""

    backend = "kv"

    def __init__(self, table: str, conn: Connection, *, key: str | None, save_mode: str,
                 columns: Sequence[str] | None) -> None:
        super().__init__(table, conn)
        if save_mode not in SAVE_MODES:
            raise ConfigError(f"v3io.kv save_mode must be one of {', '.join(SAVE_MODES)}, got {save_mode!r}")
        self.key, self.save_mode, self.columns = key, save_mode, list(columns or [])

    # -- sink ------------------------------------------------------------------------------------
    def write_with(self, client: Any, batch: Batch) -> None:
        if self.key is None:
            raise ConfigError(f"{self.describe()} as a sink needs key= (the column that names each item)")
        if self.key not in batch.frame.columns:
            raise ConfigError(f"{self.describe()}: the batch has no key column {self.key!r} "
                              f"(columns: {', '.join(batch.frame.columns)})")
        frame = self.drop_bad(batch, batch.frame[self.key].is_null(), f"null key {self.key!r}")
        if frame.height:
            client.write("kv", self.table, to_pandas(frame, self.describe()), index_cols=[self.key],
                         save_mode=self.save_mode)

    # -- source ----------------------------------------------------------------------------------
    def partitions(self) -> Sequence[str]:
        return ["items"]

    def open(self, partition: str, resume: Position) -> SourcePartition:
        return _KVReader(self, int(resume or 0))


class _KVReader(SourcePartition):
    """Reads the table once, in the server's order; position = items returned so far."""

    def __init__(self, table: KVTable, skip: int) -> None:
        self.table, self.read, self.skip = table, skip, skip
        self._frames: Iterator[Any] | None = None

    def next_batch(self, max_rows: int) -> pa.Table | None:
        if self._frames is None:
            self._frames = iter(self.table.client().read(
                "kv", self.table.table, columns=self.table.columns or None, iterator=True, get_raw=True,
                max_rows_in_msg=max_rows))
        for raw in self._frames:
            data = frame_to_arrow(raw.raw_frame)
            if self.skip:  # resuming: the rows before the position were already emitted
                cut = min(self.skip, data.num_rows)
                data, self.skip = data.slice(cut), self.skip - cut
            if data.num_rows:
                self.read += data.num_rows
                return data
        raise EndOfInput()

    def position(self) -> Position:
        return self.read

    def close(self) -> None:
        self._frames = None


class TSDBTable(V3ioSink):
    """A v3io TSDB table: each row is a sample at `time`, labelled by the `labels` columns."""

    backend = "tsdb"

    def __init__(self, table: str, conn: Connection, *, time: str, labels: Sequence[str],
                 metrics: Sequence[str] | None, rate: str, create: bool) -> None:
        super().__init__(table, conn)
        self.time, self.labels, self.metrics = time, list(labels), list(metrics) if metrics else None
        self.rate, self.create = rate, create

    def on_start(self, client: Any) -> None:
        if self.create:
            client.create("tsdb", self.table, rate=self.rate, if_exists=ignore_if_exists())

    def write_with(self, client: Any, batch: Batch) -> None:
        frame = batch.frame
        missing = [c for c in [self.time, *self.labels, *(self.metrics or [])] if c not in frame.columns]
        if missing:
            raise ConfigError(f"{self.describe()}: the batch has no column {missing[0]!r} "
                              f"(columns: {', '.join(frame.columns)})")
        if not isinstance(frame.schema[self.time], (pl.Datetime, pl.Date)) and not frame.schema[self.time].is_integer():
            raise ConfigError(f"{self.describe()}: time column {self.time!r} must be a datetime or epoch "
                              f"milliseconds, got {frame.schema[self.time]}")
        metrics = self.metrics or [c for c in frame.columns if c != self.time and c not in self.labels]
        for name in metrics:
            if not frame.schema[name].is_numeric():
                raise ConfigError(f"{self.describe()}: metric {name!r} is {frame.schema[name]}; TSDB metrics "
                                  "are numbers (list it in labels= or leave it out with metrics=[...])")
        frame = self.drop_bad(batch, frame[self.time].is_null(), f"null sample time {self.time!r}")
        if not frame.height:
            return
        times = frame[self.time]
        if times.dtype.is_integer():
            times = times.cast(pl.Datetime("ms"))
        frame = frame.select(times.alias(self.time), *[pl.col(c).cast(pl.String) for c in self.labels], *metrics)
        client.write("tsdb", self.table, to_pandas(frame, self.describe()), index_cols=[self.time, *self.labels])
