"""`@p.stage(node, state=sf.table(...))`: a user function `fn(df, state)` over a keyed table."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import polars as pl
import pyarrow as pa

from streamfn.batch import Batch, as_frame
from streamfn.contracts import StageRunner
from streamfn.deadletter import DeadLetter, row_payload
from streamfn.errors import StageError
from streamfn.pipeline import Node
from streamfn.stateful.keygroup import keyed_runner
from streamfn.stateful.keys import KeyOwners
from streamfn.stateful.store import KeyedTable
from streamfn.windows import TableSpec

if TYPE_CHECKING:
    from streamfn.lane import Lane

log = logging.getLogger("streamfn.stateful.tables")


def keyed_function_stage(node: Node, state_spec: Any, lane: "Lane") -> StageRunner:
    """Build the stage of one lane for a function with keyed state (called by the runtime)."""
    if not isinstance(state_spec, TableSpec):
        raise StageError(node.name, lane.source.name, lane.partition, None,
                         f"state= takes sf.table(key=...), got {state_spec!r}")
    return keyed_runner(lane, node, list(state_spec.key), lambda at: KeyedFunctionStage(node, state_spec, at))


class KeyedFunctionStage(StageRunner):
    """Calls `fn(df, state)`; a batch that raises is rolled back and retried row by row."""

    def __init__(self, node: Node, spec: TableSpec, lane: "Lane") -> None:
        assert node.fn is not None
        self.node, self.fn, self.lane = node, node.fn, lane
        self.table = KeyedTable(spec.key, schema=spec.schema, ttl_ms=spec.ttl_ms)
        self.owners = KeyOwners.for_stage(lane, node.name, list(spec.key))

    def process(self, frame: pl.DataFrame, batch: Batch) -> pl.DataFrame | None:
        """Run the function on the batch with this lane's table."""
        if all(k in frame.columns for k in self.table.key):
            self.owners.claim(frame, self.lane.id)
        mark = self.table.begin()
        try:
            return self._checked(self.fn(frame, self.table), batch)
        except StageError:
            raise
        except Exception as exc:  # a bad row: undo the batch's state changes, find the row
            self.table.rollback(mark)
            return self._row_by_row(frame, batch, exc)

    def _checked(self, out: object, batch: Batch) -> pl.DataFrame | None:
        if out is None or isinstance(out, pl.DataFrame):
            return out
        if isinstance(out, (pl.LazyFrame, pa.Table, pa.RecordBatch)):
            return as_frame(out)
        raise StageError(self.node.name, batch.source, batch.partition, batch.first_offset,
                         f"returned {type(out).__name__}; a stage must return a polars DataFrame or None")

    def _row_by_row(self, frame: pl.DataFrame, batch: Batch, first: Exception) -> pl.DataFrame | None:
        log.info("stateful stage raised on a batch; retrying row by row", extra={
            "stage": self.node.name, "lane": self.lane.id, "error": f"{type(first).__name__}: {first}"})
        outs: list[pl.DataFrame] = []
        letters: list[DeadLetter] = []
        for i in range(frame.height):
            row = frame.slice(i, 1)
            mark = self.table.begin()
            try:
                out = self._checked(self.fn(row, self.table), batch)
            except StageError:
                raise
            except Exception as exc:
                self.table.rollback(mark)
                offset, index = self.lane.row_offset(frame, batch, i)
                letters.append(DeadLetter(self.node.name, batch.source, batch.partition, offset,
                                          f"{type(exc).__name__}: {exc}", row_payload(row), index))
                continue
            if out is not None and out.height:
                outs.append(out)
        self.lane.dead_letter(letters, stage=self.node.name)
        return pl.concat(outs, how="diagonal_relaxed") if outs else None

    def snapshot(self, checkpoint_id: str) -> dict[str, Any]:
        """The table, incrementally (see KeyedTable.snapshot)."""
        return {"kind": "keyed_function", "table": self.table.snapshot(checkpoint_id)}

    def restore(self, saved: dict[str, Any]) -> None:
        """Load the table from a checkpoint."""
        self.table.restore(saved["table"])
        if len(self.table):
            self.owners.claim(self.table.frame(), self.lane.id)
