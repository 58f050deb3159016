"""Batches to and from v3io-frames: polars -> pandas for writes, raw Frame messages -> Arrow for reads.

v3io stores five types: int64, float64, string, bool and time (ns, UTC). Writes map every polars
integer to int64 (UInt64 above 2**63-1 is refused), floats and decimals to float64, strings,
categoricals and enums to string, Date and naive datetimes to UTC times, and durations to int64
nanoseconds. Binary, Time, List, Array, Struct and Object columns have no v3io type: they are
refused with the column's name (cast them, e.g. to a JSON string, first). Nulls travel as v3io's
null mask; a float NaN is sent as null.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from streamfn._optional import import_optional
from streamfn.errors import ConfigError

_INT64_MAX = 2**63 - 1


def to_pandas(frame: pl.DataFrame, where: str) -> Any:
    """A pandas DataFrame that v3io-frames encodes with the right types (no pandas string dtype)."""
    pd = import_optional("pandas", extra="v3io")
    return pd.DataFrame({name: _column(frame[name], where, pd) for name in frame.columns})


def _column(s: pl.Series, where: str, pd: Any) -> Any:
    dtype = s.dtype
    nulls = s.null_count() > 0
    if dtype.is_integer():
        if dtype == pl.UInt64 and s.max() is not None and s.max() > _INT64_MAX:  # type: ignore[operator]
            raise ConfigError(f"{where}: column {s.name!r} holds UInt64 values above 2**63-1, which v3io's "
                              "int64 cannot store")
        values = s.cast(pl.Int64)
        if not nulls:
            return values.to_numpy()
        return pd.arrays.IntegerArray(values.fill_null(0).to_numpy(), s.is_null().to_numpy())
    if dtype.is_float() or isinstance(dtype, pl.Decimal):
        return s.cast(pl.Float64).to_numpy()
    if dtype == pl.Boolean:
        return s.to_numpy() if not nulls else pd.Series(s.to_list(), dtype=object)
    if dtype in (pl.String, pl.Categorical) or isinstance(dtype, (pl.Enum, pl.Null)):
        # object, not pandas' string dtype: v3io-frames only encodes object columns as strings
        return pd.Series(s.cast(pl.String).to_list(), dtype=object)
    if isinstance(dtype, pl.Datetime) or dtype == pl.Date:
        stamps = s.cast(pl.Datetime("ns")) if dtype == pl.Date else s
        if isinstance(stamps.dtype, pl.Datetime) and stamps.dtype.time_zone is None:
            stamps = stamps.dt.replace_time_zone("UTC")
        return pd.Series(stamps.dt.convert_time_zone("UTC").dt.cast_time_unit("ns").to_pandas()).array
    if isinstance(dtype, pl.Duration):
        return _column(s.dt.cast_time_unit("ns").cast(pl.Int64), where, pd)
    raise ConfigError(f"{where}: column {s.name!r} is {dtype}, which v3io cannot store (it has int, float, "
                      "string, bool and time); cast it first, e.g. to a JSON string")


def frame_to_arrow(frame: Any) -> pa.Table:
    """A raw frames_pb2.Frame (index columns first) as an Arrow table with v3io's types."""
    fpb = import_optional("v3io_frames.frames_pb2", extra="v3io")
    cols = [c for c in list(frame.indices) + list(frame.columns) if c.dtype != fpb.NONE]
    masks: dict[str, np.ndarray] = {}
    if len(frame.null_values):
        n = len(frame.null_values)
        for i, entry in enumerate(frame.null_values):
            for name, is_null in entry.nullColumns.items():
                if is_null:
                    masks.setdefault(name, np.zeros(n, dtype=bool))[i] = True
    arrays, names = [], []
    for col in cols:
        if col.name in names:  # an index duplicated as a column (kv reads with columns=[key, ...])
            continue
        arrays.append(_array(col, masks.get(col.name), fpb))
        names.append(col.name)
    return pa.Table.from_arrays(arrays, names=names)


def _array(col: Any, mask: np.ndarray | None, fpb: Any) -> pa.Array:
    dtype = col.dtype
    if dtype == fpb.INTEGER:
        values, typ = np.asarray(col.ints, dtype=np.int64), pa.int64()
    elif dtype == fpb.FLOAT:
        values, typ = np.asarray(col.floats, dtype=np.float64), pa.float64()
    elif dtype == fpb.BOOLEAN:
        values, typ = np.asarray(col.bools, dtype=bool), pa.bool_()
    elif dtype == fpb.TIME:
        values, typ = np.asarray(col.times, dtype=np.int64), pa.timestamp("ns", tz="UTC")
    elif dtype == fpb.STRING:
        values, typ = np.asarray(list(col.strings), dtype=object), pa.string()
    elif dtype == fpb.NULL:
        return pa.nulls(col.size)
    else:
        raise ConfigError(f"v3io: column {col.name!r} has an unknown frames type {dtype}")
    if col.kind == fpb.Column.LABEL:  # one value standing for `size` rows
        values = np.repeat(values[:1], col.size)
    if mask is not None and len(mask) != len(values):
        mask = None
    if typ == pa.timestamp("ns", tz="UTC"):
        return pa.array(values, pa.int64(), mask=mask).cast(typ)
    return pa.array(values, typ, mask=mask)
