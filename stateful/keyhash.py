"""A stable hash of key columns: which key-lane (or repartition partition) owns a key.

polars' `hash` is documented as stable only within one polars version, and the owner of a key
must not move when polars is upgraded between a checkpoint and its restore (the key's state
would then sit in one key-lane while its new rows go to another). So keys are hashed here by
their text form's UTF-8 bytes with 64-bit FNV-1a, a fixed, published function, vectorised with
numpy over the distinct keys of a batch (a batch holds far fewer keys than rows), then mixed
with MurmurHash3's 64-bit finaliser so that the low bits (taken modulo the owner count) depend
on every byte.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import polars as pl

_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)
_SEPARATOR = "\x1f"  # between the columns of a compound key
_NULL = "\x00"  # a null key: hashes apart from every text


def key_text(frame: pl.DataFrame, keys: Sequence[str]) -> pl.Series:
    """One string per row naming its key (columns joined by a unit separator, nulls marked)."""
    parts = [_text(k, frame.schema[k]).fill_null(_NULL) for k in keys]
    expr = parts[0] if len(parts) == 1 else pl.concat_str(parts, separator=_SEPARATOR)
    return frame.select(expr.alias("__key")).to_series()


def _text(column: str, dtype: pl.DataType) -> pl.Expr:
    """A column's values as text: nested values (lists, structs) as JSON."""
    if dtype.is_nested():
        return pl.struct(pl.col(column).alias("k")).struct.json_encode()
    return pl.col(column).cast(pl.String)


def fnv1a(text: pl.Series) -> np.ndarray:
    """64-bit FNV-1a of each string's UTF-8 bytes (a uint64 array)."""
    arrow = text.cast(pl.String).to_arrow()
    arrow = arrow.cast("large_string").combine_chunks() if hasattr(arrow, "combine_chunks") else arrow
    offsets = np.frombuffer(arrow.buffers()[1], dtype=np.int64)[arrow.offset: arrow.offset + len(arrow) + 1]
    data_buf = arrow.buffers()[2]
    data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    starts, lengths = offsets[:-1], np.diff(offsets)
    h = np.full(len(lengths), _FNV_OFFSET, dtype=np.uint64)
    longest = int(lengths.max()) if len(lengths) else 0
    with np.errstate(over="ignore"):  # FNV's multiply wraps modulo 2**64 by design
        for j in range(longest):  # one pass per byte position, over the keys that long
            live = np.nonzero(lengths > j)[0]
            h[live] = (h[live] ^ data[starts[live] + j].astype(np.uint64)) * _FNV_PRIME
    return h


def mix(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's fmix64: spreads every input bit over the low bits."""
    with np.errstate(over="ignore"):
        h = h ^ (h >> np.uint64(33))
        h = h * np.uint64(0xFF51AFD7ED558CCD)
        h = h ^ (h >> np.uint64(33))
        h = h * np.uint64(0xC4CEB9FE1A85EC53)
        return h ^ (h >> np.uint64(33))


def owners(frame: pl.DataFrame, keys: Sequence[str], n: int) -> pl.Series:
    """For each row, which of `n` owners (0..n-1) holds its key: FNV-1a of the key text mod n."""
    text = key_text(frame, keys)
    distinct = text.unique()
    slots = pl.Series("__owner", (mix(fnv1a(distinct)) % np.uint64(n)).astype(np.uint32))
    return text.replace_strict(distinct, slots, return_dtype=pl.UInt32).alias("__owner")
