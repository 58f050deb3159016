"""The window stage: event-time windows per key, kept as partial aggregates per lane."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import polars as pl

from streamfn.batch import Batch
from streamfn.contracts import StageRunner
from streamfn.deadletter import DeadLetter, row_payload
from streamfn.errors import StageError
from streamfn.pipeline import Node
from streamfn.stateful import partials as P
from streamfn.stateful import windowmath as W
from streamfn.stateful.keygroup import keyed_runner
from streamfn.stateful.keys import KeyOwners
from streamfn.windows import Hopping, Session, Sliding, Tumbling

if TYPE_CHECKING:
    from streamfn.lane import Lane

log = logging.getLogger("streamfn.stateful.windows")

_MAX_LATE_LETTERS = 10_000  # per batch; the rest are counted in one summary letter


def window_stage(node: Node, spec: dict[str, Any], lane: "Lane") -> StageRunner:
    """Build the window stage of one lane (called by the runtime); re-keyed when it must be."""
    return keyed_runner(lane, node, list(spec["by"]), lambda at: WindowStage(node, spec, at))


class WindowStage(StageRunner):
    """Assigns records to windows, merges partial aggregates, emits windows the watermark passed."""

    def __init__(self, node: Node, spec: dict[str, Any], lane: "Lane") -> None:
        self.node, self.lane = node, lane
        self.window: Tumbling | Hopping | Sliding | Session = spec["window"]
        self.keys: list[str] = list(spec["by"])
        self.on: str = spec["on"]
        self.aggs: tuple[pl.Expr, ...] = spec["aggs"]
        self.lateness_ms: int = spec["allowed_lateness_ms"]
        self.early: bool = spec["early"]
        self.plan = P.plan(self.aggs)
        self.columns = sorted({c for e in self.aggs for c in e.meta.root_names()} - set(self.keys))
        self.max_ts: int | None = None
        self.state: pl.DataFrame | None = None  # partials per key and window, or raw rows (sliding)
        self.time_dtype: pl.DataType = pl.Int64()
        self.owners = KeyOwners.for_stage(lane, node.name, self.keys)
        self._saved: dict[str, Any] | None = None  # the last snapshot; reused while nothing changed

    # -- the runtime's calls --------------------------------------------------------------
    def process(self, frame: pl.DataFrame, batch: Batch) -> pl.DataFrame | None:
        """Fold a batch into the open windows; return the windows it closed."""
        if frame.height == 0:
            return None
        self._saved = None
        self._check_columns(frame, batch)
        in_order_max = self._in_order_max(frame)
        if in_order_max is not None:  # no record can be late: the per-record watermark is not needed
            self._fold(frame.lazy().select(*self.keys, *self.columns, W.event_ms(frame, self.on),
                                           pl.lit(W.NO_TIME, dtype=pl.Int64).alias(W.WM)))
            self.owners.claim(self.state, self.lane.id)  # type: ignore[arg-type]
            self._advance(in_order_max)
        else:
            marked = W.with_watermarks(frame.lazy().with_columns(W.event_ms(frame, self.on)),
                                       self.max_ts, self.lateness_ms)
            self._advance(self._fold_marked(frame, marked, batch, claim=True))
        return self._emit(None if self.max_ts is None else self.max_ts - self.lateness_ms)

    def _in_order_max(self, frame: pl.DataFrame) -> int | None:
        """The batch's largest event time when none of its records can be late, else None.

        Tumbling windows, event times present and in order: a record's watermark is then at most
        the one before it, which its own window outlives, or the lane's watermark before the
        batch; so when the first record's window ends after that, no record is late (O(1)).
        """
        if not isinstance(self.window, Tumbling) or self.lateness_ms < 0:
            return None
        column = frame.get_column(self.on)
        if isinstance(column.dtype, pl.Datetime):
            ts = column.dt.epoch("ms")
        elif column.dtype.is_integer():
            ts = column.cast(pl.Int64)
        else:
            return None
        if ts.null_count() or not ts.is_sorted():
            return None
        size = self.window.size_ms
        watermark = (W.NO_TIME if self.max_ts is None else self.max_ts) - self.lateness_ms
        if int(ts[0]) // size * size + size <= watermark:
            return None
        return int(ts[-1])

    # -- as one key-lane of a re-keyed stage (streamfn.stateful.exchange) ---------------------
    def fold_routed(self, frame: pl.DataFrame, marks: pl.DataFrame, batch: Batch) -> pl.DataFrame | None:
        """Fold rows whose event time and watermark (TS, WM) their source lane computed.

        A record's watermark is its source lane's, but never below what this key-lane already
        emitted (max_ts - lateness), so a window is emitted once even when a lane joins late.
        """
        if frame.height == 0:
            return None
        self._saved = None
        self._check_columns(frame, batch)
        marked = frame.lazy().with_columns(marks.get_column(W.TS), marks.get_column(W.WM))
        if self.max_ts is not None:
            marked = marked.with_columns(pl.max_horizontal(W.WM, pl.lit(self.max_ts - self.lateness_ms)))
        self._fold_marked(frame, marked, batch)
        if not self.early or self.state is None or self.state.height == 0:
            return None
        return self._finish(self.state, final=False)

    def advance_to(self, max_ts: int | None) -> pl.DataFrame | None:
        """Move this key-lane's event time to the source lanes' minimum; emit what closed."""
        if max_ts is None or (self.max_ts is not None and max_ts <= self.max_ts):
            return None
        self._saved = None
        self.max_ts = max_ts
        return self._emit(max_ts - self.lateness_ms, early=False)

    def _fold_marked(self, frame: pl.DataFrame, marked: pl.LazyFrame, batch: Batch, *,
                     claim: bool = False) -> int | None:
        """Dead-letter late records, fold the rest; return the batch's largest event time.

        With claim, the batch's keys are claimed for this lane (KeyOwners): those of the late
        rows, and those of the rest from the folded state, which holds them once per window
        (hashing a few hundred keys instead of every row).
        """
        needed = [*self.keys, *self.columns, W.TS, W.WM]
        late = W.late_mask(self.window) | pl.col(W.TS).is_null()  # no event time: a dead letter too
        rows = marked.select(needed).with_columns(late.fill_null(True).alias("__late")).collect()
        late_rows = rows.get_column("__late")
        if late_rows.any():
            if claim:
                self.owners.claim(rows.filter(late_rows), self.lane.id)
            self._dead_letter_late(frame, batch, rows)
        batch_max = rows.get_column(W.TS).max()
        self._fold(rows.lazy().filter(~pl.col("__late")).drop("__late"))
        if claim and self.state is not None:
            self.owners.claim(self.state, self.lane.id)
        return None if batch_max is None else int(batch_max)  # type: ignore[arg-type]

    def _advance(self, batch_max: int | None) -> None:
        if batch_max is not None and (self.max_ts is None or batch_max > self.max_ts):
            self.max_ts = batch_max

    def finish(self) -> pl.DataFrame | None:
        """End of bounded input: the watermark jumps to the end and every window is emitted.

        The lane's watermark then stays past the windows emitted, so a later run that resumes
        from this checkpoint with more input treats records for them as late (a window is
        emitted once) instead of opening them again with a partial count.
        """
        out = self._emit(2**62)
        self._saved = None
        if out is not None and out.height:
            ends = out.get_column("window_end")
            last = int(ends.dt.epoch("ms").max() if isinstance(ends.dtype, pl.Datetime) else ends.max())
            closed = last + self.lateness_ms + (1 if isinstance(self.window, Sliding) else 0)
            self.max_ts = closed if self.max_ts is None else max(self.max_ts, closed)
        return out

    def snapshot(self, checkpoint_id: str) -> dict[str, Any]:
        """The open windows' partial aggregates and the lane's event-time progress."""
        if self._saved is not None:  # unchanged: the checkpointer reuses the files it wrote
            return self._saved
        tz = self.time_dtype.time_zone if isinstance(self.time_dtype, pl.Datetime) else None
        self._saved = {"kind": "window", "max_ts": self.max_ts, "state": self.state,
                       "datetime": isinstance(self.time_dtype, pl.Datetime), "time_zone": tz}
        return self._saved

    def restore(self, saved: dict[str, Any]) -> None:
        """Load what `snapshot` saved."""
        self._saved = None
        self.max_ts = saved.get("max_ts")
        self.state = saved.get("state")
        if saved.get("datetime"):
            self.time_dtype = pl.Datetime("ms", saved.get("time_zone"))
        if self.state is not None:
            self.owners.claim(self.state, self.lane.id)

    # -- folding --------------------------------------------------------------------------
    def _fold(self, rows: pl.LazyFrame) -> None:
        keys, spec = self.keys, self.window
        if isinstance(spec, Sliding):
            new = rows.drop(W.WM).with_columns(pl.lit(False).alias("__done")).collect()
            self.state = new if self.state is None else pl.concat([self.state, new], how="vertical_relaxed")
            return
        if isinstance(spec, Session):
            fresh = W.session_partials(rows.drop(W.WM), spec, keys, self.plan)
        else:
            fresh = W.fixed_partials(rows, spec, keys, self.plan)
        fresh = fresh.select([*keys, W.WS, W.WE, *self.plan.columns])
        combined = fresh if self.state is None else pl.concat([self.state.lazy(), fresh], how="vertical_relaxed")
        if isinstance(spec, Session):
            merged = W.merge_sessions(combined, keys, self.plan)
        else:
            merged = W.merge_fixed(combined, keys, self.plan)
        self.state = merged.select([*keys, W.WS, W.WE, *self.plan.columns]).collect()

    def _emit(self, watermark: int | None, *, early: bool = True) -> pl.DataFrame | None:
        if self.state is None or watermark is None or self.state.height == 0:
            return None
        if isinstance(self.window, Sliding):
            return self._emit_sliding(watermark)
        closing = pl.col(W.WE) <= watermark
        done = self.state.filter(closing)
        if done.height:
            self.state = self.state.filter(~closing)
        outputs = []
        if done.height:
            outputs.append(self._finish(done, final=True))
        if early and self.early and self.state.height:
            outputs.append(self._finish(self.state, final=False))
        if not outputs:
            return None
        return pl.concat(outputs) if len(outputs) > 1 else outputs[0]

    def _emit_sliding(self, watermark: int) -> pl.DataFrame | None:
        assert self.state is not None and isinstance(self.window, Sliding)
        emit = (~self.state.get_column("__done")) & (self.state.get_column(W.TS) < watermark)
        out = None
        if emit.any():
            out = W.sliding_results(self.state.drop("__done"), self.window, self.keys, self.aggs, emit)
            out = self._shape(out.rename({W.WS: "window_start", W.WE: "window_end"}))
        keep = pl.col(W.TS) > watermark - self.window.size_ms
        self.state = self.state.with_columns((pl.col("__done") | emit).alias("__done")).filter(keep)
        return out

    def _finish(self, partial_rows: pl.DataFrame, *, final: bool) -> pl.DataFrame:
        done = P.finished(partial_rows, [*self.keys, W.WS, W.WE], self.plan).collect()
        done = done.rename({W.WS: "window_start", W.WE: "window_end"}).sort([*self.keys, "window_start"])
        if self.early:
            done = done.with_columns(pl.lit(final).alias("final"))
        return self._shape(done)

    def _shape(self, out: pl.DataFrame) -> pl.DataFrame:
        if isinstance(self.time_dtype, pl.Datetime):
            return out.with_columns(pl.col("window_start", "window_end").cast(self.time_dtype))
        return out

    # -- checks and late records ---------------------------------------------------------------
    def _check_columns(self, frame: pl.DataFrame, batch: Batch) -> None:
        missing = [c for c in (*self.keys, self.on, *self.columns) if c not in frame.schema]
        if missing:
            raise StageError(self.node.name, batch.source, batch.partition, batch.first_offset,
                             f"the window needs column(s) {missing}; the rows have {frame.columns}")
        dtype = frame.schema[self.on]
        if isinstance(dtype, pl.Datetime):
            self.time_dtype = pl.Datetime("ms", dtype.time_zone)

    def _dead_letter_late(self, frame: pl.DataFrame, batch: Batch, marked: pl.DataFrame) -> None:
        """Late records (and records without an event time) go to the dead letters with the reason."""
        indices = marked.with_row_index("__i").filter(pl.col("__late")).select("__i", W.TS, W.WM)
        letters = []
        for i, ts, wm in indices.head(_MAX_LATE_LETTERS).iter_rows():
            offset, row = self.lane.row_offset(frame, batch, i)
            if ts is None:
                reason = f"no event time: column {self.on!r} is null, so no window can hold the record"
            else:
                reason = (f"late: event time {ts} ms is behind the watermark {wm} ms "
                          f"(allowed_lateness={self.lateness_ms} ms); its window already closed")
            letters.append(DeadLetter(self.node.name, batch.source, batch.partition, offset, reason,
                                      row_payload(frame.slice(i, 1)), row))
        if indices.height > _MAX_LATE_LETTERS:
            letters.append(DeadLetter(self.node.name, batch.source, batch.partition, batch.first_offset,
                                      f"late: {indices.height - _MAX_LATE_LETTERS} more late records in "
                                      "this batch (payloads not kept)", ""))
        self.lane.dead_letter(letters, stage=self.node.name)
