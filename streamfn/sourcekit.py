"""The contract kit every source runs in its tests: read, resume, end, close.

    from streamfn.sourcekit import check_source
    check_source(files.ndjson(path), expected_rows=1000)
"""
from __future__ import annotations

import polars as pl

from streamfn.contracts import Source, SourcePartition
from streamfn.errors import EndOfInput

_MAX_EMPTY_READS = 10_000


def read_all(part: SourcePartition, max_rows: int) -> list[pl.DataFrame]:
    """Every batch of a finite partition until EndOfInput, checking positions advance."""
    frames: list[pl.DataFrame] = []
    empty = 0
    while True:
        before = part.position()
        try:
            data = part.next_batch(max_rows)
        except EndOfInput:
            return frames
        if data is None:
            empty += 1
            assert empty < _MAX_EMPTY_READS, "the partition returned None too often without ending"
            continue
        frame = data if isinstance(data, pl.DataFrame) else pl.from_arrow(data)
        assert isinstance(frame, pl.DataFrame)
        assert frame.height <= max_rows, f"next_batch({max_rows}) returned {frame.height} rows"
        after = part.position()
        if isinstance(before, int) and isinstance(after, int):
            assert after >= before + frame.height, f"position went from {before} to {after} for {frame.height} rows"
        frames.append(frame)


def check_source(source: Source, *, expected_rows: int, max_rows: int = 7) -> pl.DataFrame:
    """Run the source contract on a finite source and return every row it gave.

    Checks: small max_rows is honoured; positions advance; a partition reopened at a
    position saved halfway gives exactly the rows after it; close() may be called twice.
    """
    frames: list[pl.DataFrame] = []
    for partition in source.partitions():
        part = source.open(partition, None)
        batches = read_all(part, max_rows)
        end = part.position()
        part.take_rejects()
        part.close()
        part.close()
        rows = pl.concat(batches) if batches else pl.DataFrame()
        frames.append(rows)
        if len(batches) >= 2:  # resume from the position after the first batch
            first = source.open(partition, None)
            head = first.next_batch(max_rows)
            middle = first.position()
            first.close()
            assert head is not None
            resumed = source.open(partition, middle)
            rest = read_all(resumed, max_rows)
            assert resumed.position() == end, f"resumed partition ended at {resumed.position()}, not {end}"
            resumed.close()
            tail = pl.concat(rest) if rest else rows.clear()
            assert tail.equals(rows.slice(rows.height - tail.height)), "resume did not continue where it stopped"
            assert tail.height == rows.height - (head.height if isinstance(head, pl.DataFrame) else head.num_rows)
    every = pl.concat(frames, how="diagonal_relaxed") if frames else pl.DataFrame()
    assert every.height == expected_rows, f"the source gave {every.height} rows, expected {expected_rows}"
    return every
