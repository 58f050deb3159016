"""The unit that flows: an Arrow-backed polars DataFrame plus where it came from."""
from __future__ import annotations

from dataclasses import dataclass, replace

import polars as pl
import pyarrow as pa

Position = int | str | None  # JSON-safe; None = the configured start


@dataclass(frozen=True, slots=True)
class Batch:
    """Rows of one source partition, with their lineage.

    The rows are kept as a polars DataFrame (Arrow memory) so that stages get
    them without a copy; `table` gives the same memory as a pyarrow Table.
    """

    frame: pl.DataFrame
    source: str
    partition: str
    first_offset: Position = None
    last_offset: Position = None
    watermark: int | None = None  # event time, epoch ms: no later row is older than this

    @property
    def table(self) -> pa.Table:
        """The rows as a pyarrow Table (zero-copy)."""
        return self.frame.to_arrow()

    @property
    def num_rows(self) -> int:
        return self.frame.height

    def with_frame(self, frame: pl.DataFrame) -> "Batch":
        """The same lineage with other rows (a stage's output)."""
        return replace(self, frame=frame)


def as_frame(data: object) -> pl.DataFrame:
    """Turn a pyarrow Table/RecordBatch or polars frame into a DataFrame without copying."""
    if isinstance(data, pl.DataFrame):
        return data
    if isinstance(data, pl.LazyFrame):
        return data.collect()
    if isinstance(data, (pa.Table, pa.RecordBatch)):
        frame = pl.from_arrow(data, rechunk=False)
        assert isinstance(frame, pl.DataFrame)
        return frame
    raise TypeError(f"expected a polars DataFrame or a pyarrow Table, got {type(data).__name__}")
