"""Window maths as pure functions over polars frames (no state, no I/O).

Event time is an Int64 column of epoch milliseconds (`TS`). Every record gets the watermark
that held just before it, `max(ts of earlier records) - allowed_lateness`, so what is late
does not depend on where batches start and end.

Lateness rules (a window is emitted once, when the lane's watermark reaches its end):
- tumbling / hopping: a record is dropped from a window whose end <= its watermark;
- session / sliding: a record is late when its ts < its watermark.
"""
from __future__ import annotations

import polars as pl

from streamfn.stateful import partials as P
from streamfn.windows import Hopping, Session, Sliding, Tumbling

TS, WS, WE, WM = "__ts", "__ws", "__we", "__wm"
NO_TIME = -(2**62)  # "before everything", far enough from Int64's minimum to subtract from


def event_ms(frame: pl.DataFrame, on: str) -> pl.Expr:
    """An expression for the event time of column `on` in epoch ms (ints are taken as ms)."""
    dtype = frame.schema.get(on)
    if dtype is None:
        raise KeyError(on)
    if isinstance(dtype, pl.Datetime):
        return pl.col(on).dt.epoch("ms").alias(TS)
    if isinstance(dtype, pl.Date):
        return (pl.col(on).cast(pl.Int64) * 86_400_000).alias(TS)
    if dtype.is_integer():
        return pl.col(on).cast(pl.Int64).alias(TS)
    raise TypeError(f"column {on!r} is {dtype}; event time must be an integer (epoch ms) or a datetime")


def with_watermarks(frame: pl.LazyFrame, max_before: int | None, lateness_ms: int) -> pl.LazyFrame:
    """Add WM: the watermark each record saw (records in arrival order)."""
    start = NO_TIME if max_before is None else max_before
    prev = pl.col(TS).cum_max().shift(1, fill_value=start)
    return frame.with_columns((pl.max_horizontal(prev, pl.lit(start)) - lateness_ms).alias(WM))


def lane_marks(frame: pl.DataFrame, on: str, max_before: int | None, lateness_ms: int) -> pl.DataFrame:
    """Each record's event time (TS) and watermark (WM), in the order of a lane whose largest
    event time so far is `max_before`."""
    return with_watermarks(frame.lazy().select(event_ms(frame, on)), max_before, lateness_ms).collect()


def latest(max_before: int | None, marks: pl.DataFrame) -> int | None:
    """A lane's largest event time once the records of `marks` are in."""
    batch_max = marks.get_column(TS).max()
    if batch_max is None:
        return max_before
    return int(batch_max) if max_before is None else max(max_before, int(batch_max))  # type: ignore[arg-type]


def assign_fixed(frame: pl.LazyFrame, spec: Tumbling | Hopping) -> pl.LazyFrame:
    """Pair each record with the windows [WS, WE) that hold it (one row per pair)."""
    if isinstance(spec, Tumbling):
        start = pl.col(TS) // spec.size_ms * spec.size_ms
        return frame.with_columns(start.alias(WS), (start + spec.size_ms).alias(WE))
    newest = pl.col(TS) // spec.every_ms * spec.every_ms
    copies = -(-spec.size_ms // spec.every_ms)
    parts = [frame.with_columns((newest - j * spec.every_ms).alias(WS)) for j in range(copies)]
    pairs = pl.concat(parts).with_columns((pl.col(WS) + spec.size_ms).alias(WE))
    return pairs.filter(pl.col(WE) > pl.col(TS))


def late_mask(spec: Tumbling | Hopping | Session | Sliding) -> pl.Expr:
    """True for records that are late for every window they would fall in (before assignment)."""
    if isinstance(spec, Tumbling):
        return (pl.col(TS) // spec.size_ms * spec.size_ms + spec.size_ms) <= pl.col(WM)
    if isinstance(spec, Hopping):  # the newest window holding the record is the last to close
        return (pl.col(TS) // spec.every_ms * spec.every_ms + spec.size_ms) <= pl.col(WM)
    return pl.col(TS) < pl.col(WM)


def fixed_partials(frame: pl.LazyFrame, spec: Tumbling | Hopping, keys: list[str],
                   plan: P.Plan) -> pl.LazyFrame:
    """Partial aggregates per key and window for records that are not late."""
    pairs = assign_fixed(frame, spec).filter(pl.col(WE) > pl.col(WM))
    return P.partials(pairs, [*keys, WS, WE], plan)


def session_partials(frame: pl.LazyFrame, spec: Session, keys: list[str], plan: P.Plan) -> pl.LazyFrame:
    """Sessions within one batch: per key, records closer than the gap chain into one."""
    ordered = frame.sort([*keys, TS])
    new_key = pl.any_horizontal([pl.col(k).ne_missing(pl.col(k).shift(1)) for k in keys])
    gap = (pl.col(TS) - pl.col(TS).shift(1)) >= spec.gap_ms
    sid = (new_key | gap).fill_null(True).cum_sum().alias("__sid")
    grouped = ordered.with_columns(sid).group_by([*keys, "__sid"]).agg(
        pl.col(TS).min().alias(WS), (pl.col(TS).max() + spec.gap_ms).alias(WE), *plan.partial)
    return grouped.drop("__sid")


def merge_sessions(sessions: pl.LazyFrame, keys: list[str], plan: P.Plan) -> pl.LazyFrame:
    """Merge a key's sessions whose intervals [WS, WE) overlap, transitively."""
    ordered = sessions.sort([*keys, WS])
    reach = pl.col(WE).cum_max().over(keys).shift(1)  # the furthest end of earlier sessions
    new_key = pl.any_horizontal([pl.col(k).ne_missing(pl.col(k).shift(1)) for k in keys])
    starts = (new_key | (pl.col(WS) >= reach.fill_null(NO_TIME))).fill_null(True)
    labelled = ordered.with_columns(starts.cum_sum().alias("__sid"))
    merged = labelled.group_by([*keys, "__sid"]).agg(
        pl.col(WS).min(), pl.col(WE).max(), *plan.merge)
    return merged.drop("__sid")


def merge_fixed(state: pl.LazyFrame, keys: list[str], plan: P.Plan) -> pl.LazyFrame:
    """Combine partial rows of the same key and window."""
    return P.merged(state, [*keys, WS, WE], plan)


def sliding_results(buffer: pl.DataFrame, spec: Sliding, keys: list[str], aggs: tuple[pl.Expr, ...],
                    emit: pl.Series) -> pl.DataFrame:
    """Per buffered record flagged in `emit`: aggregates over its key's records in (ts - size, ts]."""
    ordered = buffer.with_columns(emit.alias("__emit")).sort([*keys, TS])
    rolled = ordered.rolling(index_column=TS, period=f"{spec.size_ms}i", closed="right",
                             group_by=keys).agg(*aggs)
    flags = ordered.get_column("__emit")
    out = rolled.filter(flags)
    return out.with_columns((pl.col(TS) - spec.size_ms).alias(WS), pl.col(TS).alias(WE)).drop(TS)
