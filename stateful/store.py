"""A keyed table held as one polars DataFrame, with batch get/put/delete, TTL and incremental snapshots."""
from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import polars as pl
import pyarrow as pa

from streamfn.errors import ConfigError

TOUCHED = "__touched_ms"
DELETED = "__deleted"
_MAX_DELTAS = 16  # a chain longer than this (or deltas over half the table) is rewritten in full


class KeyedTable:
    """Rows keyed by `key`; every operation takes and gives whole frames, never single rows.

    Snapshots are incremental: the first is the whole table, later ones only the rows of keys
    changed since (upserts and deletions), until the chain is worth compacting.
    """

    def __init__(self, key: Sequence[str], *, schema: Mapping[str, Any] | None = None,
                 ttl_ms: int | None = None, clock: Callable[[], float] = time.time) -> None:
        self.key = list(key)
        self.schema = dict(schema) if schema is not None else None
        self.ttl_ms = ttl_ms
        self._clock = clock
        self._frame = self._empty()
        self._changed: list[pl.DataFrame] = []  # key frames touched since the last snapshot
        self._chain: dict[str, Any] | None = None
        self._last_expiry_ms = 0

    def _empty(self) -> pl.DataFrame:
        columns = dict(self.schema) if self.schema else {k: pl.String for k in self.key}
        return pl.DataFrame(schema={**columns, TOUCHED: pl.Int64})

    # -- batch operations ------------------------------------------------------------------
    def __len__(self) -> int:
        return self._frame.height

    def get(self, keys: pl.DataFrame) -> pl.DataFrame:
        """A left join of `keys` (frame with the key columns) on the table: nulls where absent."""
        self._expire()
        wanted = keys.select(self.key)
        if self._frame.height == 0 and not self.schema:  # no rows yet, so no columns to give
            return wanted
        table = self._frame.drop(TOUCHED, strict=False)
        return wanted.join(table, on=self.key, how="left", maintain_order="left", nulls_equal=True)

    def put(self, rows: pl.DataFrame) -> None:
        """Upsert rows by key (the last row of a key wins)."""
        missing = [k for k in self.key if k not in rows.columns]
        if missing:
            raise ConfigError(f"state.put: the rows lack the key column(s) {missing}; they have {rows.columns}")
        if rows.height == 0:
            return
        rows = rows.unique(subset=self.key, keep="last", maintain_order=True)
        if self.schema:
            unknown = [c for c in rows.columns if c not in self.schema]
            if unknown:
                raise ConfigError(f"state.put: column(s) {unknown} are not in the table's schema "
                                  f"({', '.join(self.schema)})")
            rows = rows.cast({c: self.schema[c] for c in rows.columns})  # type: ignore[arg-type]
        rows = rows.with_columns(pl.lit(int(self._clock() * 1000), dtype=pl.Int64).alias(TOUCHED))
        if self._frame.height == 0 and not self.schema:
            self._frame = rows  # the first rows set the columns' types
        else:
            kept = self._frame.filter(~self._among(rows))
            self._frame = pl.concat([kept, rows], how="diagonal_relaxed")
        self._changed.append(rows.select(self.key))
        self._expire()

    def delete(self, keys: pl.DataFrame) -> None:
        """Remove the rows of these keys (absent keys are ignored)."""
        wanted = keys.select(self.key)
        if self._frame.height:
            self._frame = self._frame.filter(~self._among(wanted))
        self._changed.append(wanted)

    def _among(self, keys: pl.DataFrame) -> pl.Expr:
        return _among(self.key, keys)

    def frame(self) -> pl.DataFrame:
        """The whole table."""
        self._expire()
        return self._frame.drop(TOUCHED, strict=False)

    # the StateStore contract's Arrow names
    def get_many(self, keys: pa.Array | pa.Table) -> pa.Table:
        """Rows for these keys (nulls where absent), in key order."""
        frame = pl.from_arrow(keys) if isinstance(keys, pa.Table) else pl.DataFrame({self.key[0]: keys})
        assert isinstance(frame, pl.DataFrame)
        return self.get(frame).to_arrow()

    def put_many(self, table: pa.Table) -> None:
        """Upsert rows by key."""
        frame = pl.from_arrow(table)
        assert isinstance(frame, pl.DataFrame)
        self.put(frame)

    def _expire(self) -> None:
        if self.ttl_ms is None:
            return
        now = int(self._clock() * 1000)
        if now - self._last_expiry_ms < max(1, self.ttl_ms // 10):
            return
        self._last_expiry_ms = now
        stale = pl.col(TOUCHED) < now - self.ttl_ms
        gone = self._frame.filter(stale)
        if gone.height:
            self._frame = self._frame.filter(~stale)
            self._changed.append(gone.select(self.key))

    # -- transactions (a stage function that raises leaves no trace) ------------------------------
    def begin(self) -> tuple[pl.DataFrame, int]:
        """Remember the current contents (frames are immutable, so this is free)."""
        return self._frame, len(self._changed)

    def rollback(self, mark: tuple[pl.DataFrame, int]) -> None:
        """Go back to what `begin` saw."""
        self._frame, n = mark
        del self._changed[n:]

    # -- snapshots --------------------------------------------------------------------------
    def snapshot(self, checkpoint_id: str) -> dict[str, Any]:
        """The table as a chain: a base frame and deltas of changed keys (frames or file refs).

        The checkpointer replaces each frame by a reference to the file it wrote, in this same
        dict; the next snapshot reuses those references, so unchanged data is not rewritten.
        """
        changed = self._changed
        self._changed = []
        prev = self._chain
        if prev is not None and not changed:
            return prev
        if prev is None or len(prev["deltas"]) >= _MAX_DELTAS:
            self._chain = {"kind": "keyed_table", "key": self.key, "base": self._frame, "deltas": [],
                           "delta_rows": 0}
            return self._chain
        keys = pl.concat(changed, how="vertical_relaxed").unique()
        if self._frame.height == 0:  # everything changed was deleted
            delta = keys.with_columns(pl.lit(True).alias(DELETED))
        else:
            upserts = self._frame.filter(self._among(keys))
            deleted = keys.join(upserts.select(self.key), on=self.key, how="anti", nulls_equal=True)
            delta = pl.concat([upserts.with_columns(pl.lit(False).alias(DELETED)),
                               deleted.with_columns(pl.lit(True).alias(DELETED))], how="diagonal_relaxed")
        total = prev["delta_rows"] + delta.height
        if total > max(1, self._frame.height) // 2:
            self._chain = {"kind": "keyed_table", "key": self.key, "base": self._frame, "deltas": [],
                           "delta_rows": 0}
        else:
            self._chain = {"kind": "keyed_table", "key": self.key, "base": prev["base"],
                           "deltas": [*prev["deltas"], delta], "delta_rows": total}
        return self._chain

    def restore(self, saved: Mapping[str, Any]) -> None:
        """Rebuild the table from a chain whose frames the checkpointer loaded."""
        frame: pl.DataFrame = saved["base"]
        for delta in saved["deltas"]:
            if frame.height == 0:
                frame = delta.filter(~pl.col(DELETED)).drop(DELETED)
                continue
            frame = frame.filter(~_among(self.key, delta))
            upserts = delta.filter(~pl.col(DELETED)).drop(DELETED)
            frame = pl.concat([frame, upserts], how="diagonal_relaxed")
        self._frame = frame
        self._changed = []
        self._chain = None  # the next snapshot writes the table in full


def _among(key: list[str], keys: pl.DataFrame) -> pl.Expr:
    """True for rows whose key is in `keys` (a hash set of the few keys, probed by each row)."""
    if len(key) == 1:
        return pl.col(key[0]).is_in(keys.get_column(key[0]).implode(), nulls_equal=True)
    wanted = keys.select(pl.struct(key)).to_series().implode()
    return pl.struct(key).is_in(wanted, nulls_equal=True)
