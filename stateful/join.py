"""`stream.join(table_node, on=...)`: enrich a stream with the latest row per key of a table.

The table's rows arrive in the lanes of the table's source; each such lane keeps the rows it
read (and checkpoints them). Stream lanes look rows up across every table lane of this
process, so the table is complete here when this process reads all of the table's partitions
(a small reference table, or a topic every worker reads in full).
"""
from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

import polars as pl

from streamfn.batch import Batch
from streamfn.contracts import StageRunner
from streamfn.errors import GraphError, StageError
from streamfn.pipeline import Node
from streamfn.stateful.store import KeyedTable

if TYPE_CHECKING:
    from streamfn.lane import Lane

_SHARED_ATTR = "_streamfn_join_tables"
_SHARED_LOCK = threading.Lock()


def join_stage(node: Node, spec: dict[str, Any], lane: "Lane") -> "JoinStage":
    """Build the join stage of one lane (called by the runtime)."""
    return JoinStage(node, spec, lane)


class JoinStage(StageRunner):
    """In a table lane: upsert rows. In a stream lane: left-join rows on the latest table rows."""

    def __init__(self, node: Node, spec: dict[str, Any], lane: "Lane") -> None:
        self.node, self.lane = node, lane
        self.on: list[str] = list(spec["on"])
        reachable = {lane.source.name, *(n.name for n in lane.plan)}
        is_table, is_stream = spec["table"] in reachable, spec["stream"] in reachable
        if is_table and is_stream:
            raise GraphError(f"join {node.name!r}: the stream and the table both come from source "
                             f"{lane.source.name!r}; join a stream with a table from another source")
        self.is_table = is_table
        self.table = KeyedTable(self.on)
        with _SHARED_LOCK:
            shared = getattr(lane.rt, _SHARED_ATTR, None)
            if shared is None:
                shared = {}
                setattr(lane.rt, _SHARED_ATTR, shared)
            self.tables: dict[str, KeyedTable] = shared.setdefault(node.name, {})
        if is_table:
            self.tables[lane.id] = self.table

    def process(self, frame: pl.DataFrame, batch: Batch) -> pl.DataFrame | None:
        """Table rows update the table (no output); stream rows come out enriched."""
        missing = [c for c in self.on if c not in frame.columns]
        if missing:
            raise StageError(self.node.name, batch.source, batch.partition, batch.first_offset,
                             f"join needs column(s) {missing}; the rows have {frame.columns}")
        if self.is_table:
            self.table.put(frame)
            return None
        parts = [t.frame() for t in list(self.tables.values()) if len(t)]
        if not parts:
            return frame
        table = parts[0] if len(parts) == 1 else pl.concat(parts, how="diagonal_relaxed").unique(
            subset=self.on, keep="last")
        extra = [c for c in table.columns if c not in self.on and c in frame.columns]
        table = table.rename({c: f"{c}_right" for c in extra})
        return frame.join(table, on=self.on, how="left", maintain_order="left", nulls_equal=True)

    def snapshot(self, checkpoint_id: str) -> dict[str, Any] | None:
        """A table lane saves its rows; a stream lane keeps nothing."""
        if not self.is_table:
            return None
        return {"kind": "join_table", "table": self.table.snapshot(checkpoint_id)}

    def restore(self, saved: dict[str, Any]) -> None:
        """Load the table rows this lane had read."""
        self.table.restore(saved["table"])
