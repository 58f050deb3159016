"""A lane: one source partition read in order and pushed through the stages to the sinks."""
from __future__ import annotations

import importlib
import logging
import threading
import time
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

import polars as pl
import pyarrow as pa

from streamfn.batch import Batch, Position, as_frame
from streamfn.contracts import Sink, SourcePartition, StageRunner
from streamfn.deadletter import DeadLetter, row_payload
from streamfn.errors import Backpressure, EndOfInput, StageError
from streamfn.gpu import bind_stage
from streamfn.pipeline import Node
from streamfn.summary import NodeStats

if TYPE_CHECKING:
    from streamfn.runtime import Runtime

log = logging.getLogger("streamfn.lane")

PROGRESS, IDLE, DONE = "progress", "idle", "done"
_NO_GATE = nullcontext()


class StageOutputError(StageError):
    """A stage returned something that is not a DataFrame or None."""


class FunctionStage(StageRunner):
    """Runs a user function `f(df) -> df | None`; if it raises, retries row by row."""

    def __init__(self, node: Node, lane: "Lane") -> None:
        assert node.fn is not None
        self.node, self.lane = node, lane
        self.engine, self.fn = bind_stage(node)  # cpu, or cudf / polars' GPU engine (streamfn.gpu)

    def process(self, frame: pl.DataFrame, batch: Batch) -> pl.DataFrame | None:
        try:
            out = self.fn(frame)
        except Exception as exc:  # the batch holds a bad row: find it, keep the rest
            return self._row_by_row(frame, batch, exc)
        return self._checked(out, batch)

    def _checked(self, out: object, batch: Batch) -> pl.DataFrame | None:
        if out is None or isinstance(out, pl.DataFrame):
            return out
        if isinstance(out, (pl.LazyFrame, pa.Table, pa.RecordBatch)):
            return as_frame(out)
        raise StageOutputError(self.node.name, batch.source, batch.partition, batch.first_offset,
                               f"returned {type(out).__name__}; a stage must return a polars "
                               "DataFrame (or None to drop the batch)")

    def _row_by_row(self, frame: pl.DataFrame, batch: Batch, first: Exception) -> pl.DataFrame | None:
        log.info("stage raised on a batch; retrying row by row", extra={
            "stage": self.node.name, "lane": self.lane.id, "rows": frame.height,
            "error": f"{type(first).__name__}: {first}"})
        outs: list[pl.DataFrame] = []
        letters: list[DeadLetter] = []
        for i in range(frame.height):
            row = frame.slice(i, 1)
            try:
                out = self._checked(self.fn(row), batch)
            except StageOutputError:
                raise
            except Exception as exc:
                offset, index = self.lane.row_offset(frame, batch, i)
                letters.append(DeadLetter(self.node.name, batch.source, batch.partition, offset,
                                          f"{type(exc).__name__}: {exc}", row_payload(row), index))
                continue
            if out is not None and out.height:
                outs.append(out)
        self.lane.dead_letter(letters, stage=self.node.name)
        if not outs:
            return None
        return pl.concat(outs, how="diagonal_relaxed")


class Lane:
    """Reads one partition and runs its batches through the plan, one at a time."""

    def __init__(self, runtime: "Runtime", source: Node, partition: str, reader: SourcePartition,
                 plan: list[Node]) -> None:
        self.rt = runtime
        self.source = source
        self.partition = partition
        self.id = f"{source.name}[{partition}]"
        self.reader = reader
        self.plan = plan
        self.position: Position = reader.position()
        self.stats: dict[str, NodeStats] = {source.name: NodeStats("source")}
        # a re-keyed stage (streamfn.stateful.exchange) shares state across the lanes of a source:
        # its group checkpoints them together, and batches in flight hold its gate
        self.group: Any = None
        self.gate: Any = _NO_GATE
        self.runners: dict[str, StageRunner] = {}
        self.writers: dict[str, Sink] = {}
        for node in plan:
            self.stats[node.name] = NodeStats(node.kind)
            if node.kind == "stage":
                self.runners[node.name] = self._make_runner(node)
            else:
                assert isinstance(node.connector, Sink)
                self.writers[node.name] = node.connector.for_lane(self.id)
        self.dlq_writer = runtime.dead_letter_sink.for_lane(self.id)
        # where sinks' committed rows end: a replay cuts batches there (see Sink.replayed_until)
        self._replay_cuts = sorted({e for w in self.writers.values() if isinstance(e := w.replayed_until(), int)})
        self._letters: list[DeadLetter] = []
        self._source_frame: pl.DataFrame | None = None  # rows map 1:1 to offsets
        self.last_commit = time.monotonic()
        self.backoff_s = 0.0
        self.revoke_requested = False
        self.closed = threading.Event()
        self.obs = runtime.observer
        self.obs.lane_opened(self)

    def _make_runner(self, node: Node) -> StageRunner:
        if node.operator is not None:  # a built-in stateful stage lives in streamfn.stateful
            module, factory, spec = node.operator
            make = getattr(importlib.import_module(f"streamfn.stateful.{module}"), factory)
            return make(node, spec, self)
        if node.options.get("state") is not None:
            make = importlib.import_module("streamfn.stateful.tables").keyed_function_stage
            return make(node, node.options["state"], self)
        make_runner = getattr(node.fn, "make_runner", None)  # a function that brings its own runner
        if callable(make_runner):
            return make_runner(node, self)  # type: ignore[no-any-return]
        return FunctionStage(node, self)

    # -- one step -----------------------------------------------------------------------------
    def step(self) -> str:
        """Read and process one batch; say whether there was work, none yet, or the end."""
        if self.rt.stopping or self.revoke_requested:
            self.close(commit=True)
            return DONE
        with self.gate:  # commits happen outside: a group checkpoint waits for the batches in flight
            result = self._step()
        if result == DONE:
            self.close(commit=True)
        else:
            self._commit_if_due()
        return result

    def _step(self) -> str:
        before = self.position
        try:
            data = self.reader.next_batch(self._max_rows(before))
        except EndOfInput:
            self._take_rejects()
            self.run_plan({}, Batch(pl.DataFrame(), self.source.name, self.partition, before, before),
                          final=True)
            return DONE
        rejects = self._take_rejects()
        if data is None:
            self._flush_letters()
            return IDLE
        frame = as_frame(data)
        after = self.reader.position()
        last = after - 1 if isinstance(after, int) else after
        batch = Batch(frame, self.source.name, self.partition, before, last)
        self._source_frame = frame if not rejects and isinstance(before, int) else None
        stats = self.stats[self.source.name]
        stats.rows_in += frame.height + rejects
        stats.rows_out += frame.height
        stats.batches += 1
        scope = self.obs.batch_begin(self, batch, rejects)
        try:
            self.run_plan({self.source.name: [frame]}, batch)
        finally:
            self.obs.batch_end(scope)
        self.position = after
        self._flush_letters()
        return PROGRESS

    def _max_rows(self, before: Position) -> int:
        """The batch size; while replaying, a batch ends where a sink's committed rows end."""
        if self._replay_cuts and isinstance(before, int):
            for cut in self._replay_cuts:
                if cut >= before:
                    return max(1, min(self.rt.batch_rows, cut - before + 1))
        return self.rt.batch_rows

    def run_plan(self, outputs: dict[str, list[pl.DataFrame]], batch: Batch, *, final: bool = False) -> None:
        """Push frames through the stages and sinks downstream, in topological order."""
        for node in self.plan:
            frames = [f for up in node.upstreams for f in outputs.get(up.name, ())]
            stats = self.stats[node.name]
            if node.kind == "sink":
                if frames:
                    scope, started = self.obs.stage_begin(self, node, batch), time.perf_counter()
                    for frame in frames:
                        self._write(node.name, batch.with_frame(frame))
                        stats.rows_in += frame.height
                        stats.rows_out += frame.height
                        stats.batches += 1
                    rows = sum(f.height for f in frames)
                    self.obs.stage_end(scope, self, node, rows, rows, time.perf_counter() - started)
                continue
            runner = self.runners[node.name]
            results: list[pl.DataFrame] = []
            scope = self.obs.stage_begin(self, node, batch)
            started = time.perf_counter()
            for frame in frames:
                stats.rows_in += frame.height
                stats.batches += 1
                out = runner.process(frame, batch)
                if out is not None and out.height:
                    results.append(out)
            if final:
                out = runner.finish()
                if out is not None and out.height:
                    results.append(out)
            elapsed = time.perf_counter() - started
            stats.seconds += elapsed
            rows_out = sum(f.height for f in results)
            stats.rows_out += rows_out
            self.obs.stage_end(scope, self, node, sum(f.height for f in frames), rows_out, elapsed)
            if results:
                outputs[node.name] = results

    def _write(self, sink: str, batch: Batch) -> None:
        while True:
            try:
                self.writers[sink].write(batch)
                return
            except Backpressure as full:
                time.sleep(full.retry_after_s)

    # -- dead letters -----------------------------------------------------------------------
    def row_offset(self, frame: pl.DataFrame, batch: Batch, index: int) -> tuple[Position, int | None]:
        """The source offset of a row when it is known, else the batch's first offset and the row."""
        if frame is self._source_frame and isinstance(batch.first_offset, int):
            return batch.first_offset + index, None
        return batch.first_offset, index

    def dead_letter(self, letters: list[DeadLetter], *, stage: str) -> None:
        """Queue failed records for the dead-letter sink (written at the end of the step)."""
        if letters:
            self.stats[stage].errors += len(letters)
            self._letters.extend(letters)
            self.reader.dead_lettered(letters)
            self.rt.count_dead_letters(len(letters))

    def _take_rejects(self) -> int:
        rejects = self.reader.take_rejects()
        self.dead_letter([DeadLetter("parse", self.source.name, self.partition, r.offset, r.error, r.payload)
                          for r in rejects], stage=self.source.name)
        return len(rejects)

    def _flush_letters(self) -> None:
        if self._letters:
            letters, self._letters = self._letters, []
            self.rt.write_dead_letters(self.dlq_writer, letters, self.id)

    # -- commits ----------------------------------------------------------------------------
    def _commit_if_due(self) -> None:
        if time.monotonic() - self.last_commit >= self.rt.pipeline.checkpoint_interval_s:
            self.commit()

    def commit(self) -> None:
        """Flush every sink of this lane, save state, then tell the source what is durable."""
        if self.group is not None:  # re-keyed state: one checkpoint across the source's lanes
            self.group.checkpoint(self)
            return
        checkpoint_id = self.rt.next_checkpoint_id()
        started = time.perf_counter()
        self.flush(checkpoint_id)
        saved = self.rt.save_checkpoint(self, checkpoint_id)
        self.committed(checkpoint_id, started, saved)

    def flush(self, checkpoint_id: str) -> None:
        """Make this lane's output durable: dead letters and every sink writer."""
        self._flush_letters()
        for writer in self.writers.values():
            writer.flush(checkpoint_id)
        self.dlq_writer.flush(checkpoint_id)

    def committed(self, checkpoint_id: str, started: float, saved: Any) -> None:
        """The checkpoint holding this lane's position is saved: commit the sinks' transactions, then
        tell the source it is durable."""
        for writer in self.writers.values():
            writer.commit(checkpoint_id, self.position)
        self.reader.commit(self.position)
        self.last_commit = time.monotonic()
        self.obs.checkpoint(self, checkpoint_id, time.perf_counter() - started,
                            saved if isinstance(saved, int) and not isinstance(saved, bool) else None)
        log.debug("committed", extra={"lane": self.id, "offset": self.position, "checkpoint": checkpoint_id})

    def close(self, *, commit: bool) -> None:
        """Commit (unless the lane failed), then release its readers and writers."""
        try:
            if commit:
                self.commit()
        finally:
            if self.group is not None:
                self.group.detach(self)
            sinks = {node.name: node.connector for node in self.plan if node.kind == "sink"}
            for name, writer in self.writers.items():
                if writer is not sinks[name]:
                    writer.close()
            if self.dlq_writer is not self.rt.dead_letter_sink:
                self.dlq_writer.close()
            self.reader.close()
            self.obs.lane_closed(self)
            self.closed.set()
