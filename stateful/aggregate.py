"""`node.aggregate(by=, aggs=[...])`: running aggregates per key, kept as partials in a keyed table."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import polars as pl

from streamfn.batch import Batch
from streamfn.contracts import StageRunner
from streamfn.errors import GraphError, StageError
from streamfn.pipeline import Node
from streamfn.stateful import partials as P
from streamfn.stateful.keygroup import keyed_runner
from streamfn.stateful.keys import KeyOwners
from streamfn.stateful.store import KeyedTable

if TYPE_CHECKING:
    from streamfn.lane import Lane


def aggregate_stage(node: Node, spec: dict[str, Any], lane: "Lane") -> StageRunner:
    """Build the running-aggregate stage of one lane (called by the runtime); re-keyed when it must be."""
    return keyed_runner(lane, node, list(spec["by"]), lambda at: AggregateStage(node, spec, at))


class AggregateStage(StageRunner):
    """Merges each batch's partial aggregates into the table; emits the updated keys' results."""

    def __init__(self, node: Node, spec: dict[str, Any], lane: "Lane") -> None:
        self.node, self.lane = node, lane
        self.keys: list[str] = list(spec["by"])
        self.plan = P.plan(spec["aggs"])
        if self.plan.raw:
            raise GraphError(f"aggregate {node.name!r}: {', '.join(map(str, spec['aggs']))} cannot be kept "
                             "as running partials (only len/count/sum/min/max/mean and arithmetic over "
                             "them can); use window(...) for other aggregations")
        self.table = KeyedTable(self.keys)
        self.owners = KeyOwners.for_stage(lane, node.name, self.keys)

    def process(self, frame: pl.DataFrame, batch: Batch) -> pl.DataFrame | None:
        """Fold the batch in and return the new totals of the keys it touched."""
        if frame.height == 0:
            return None
        missing = [c for c in self.keys if c not in frame.columns]
        if missing:
            raise StageError(self.node.name, batch.source, batch.partition, batch.first_offset,
                             f"aggregate needs key column(s) {missing}; the rows have {frame.columns}")
        self.owners.claim(frame, self.lane.id)
        fresh = P.partials(frame, self.keys, self.plan).collect()
        if len(self.table):
            before = self.table.frame().join(fresh.select(self.keys), on=self.keys, how="semi",
                                             nulls_equal=True)
            fresh = P.merged(pl.concat([before, fresh], how="vertical_relaxed"), self.keys, self.plan).collect()
        self.table.put(fresh)
        return P.finished(fresh, self.keys, self.plan).collect()

    def snapshot(self, checkpoint_id: str) -> dict[str, Any]:
        """The partials table, incrementally."""
        return {"kind": "aggregate", "table": self.table.snapshot(checkpoint_id)}

    def restore(self, saved: dict[str, Any]) -> None:
        """Load the partials table."""
        self.table.restore(saved["table"])
        if len(self.table):
            self.owners.claim(self.table.frame(), self.lane.id)
