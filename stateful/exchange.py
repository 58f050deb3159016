"""Re-keying inside a process: keyed state when the source is not partitioned by the key.

A keyed stage (window, aggregate, `state=sf.table`) whose key is not how its source is
partitioned (files, a memory source with several partitions: no declared key) keeps its state
in N **key-lanes** instead of per source lane. Each source lane routes the rows of a batch by
a stable hash of the key (`keyhash.owners`) to the key-lane that owns the key, and runs that
key-lane's stage on them under the key-lane's lock, on the source lane's own thread; the output
continues downstream in the source lane. So every key's state is in exactly one key-lane, and no
thread or queue is added: the source lanes are the workers, the key-lanes are locked state.

Checkpoints: the key-lanes hold rows from every source lane, so a source lane may only commit
its offset once a checkpoint holds the key-lanes' state *and* every source lane's position at
the same cut. The source's lanes form a `KeyGroup`: each holds the group's `Gate` (shared)
while a batch is in flight; a checkpoint holds it alone, so it sees every lane between batches,
flushes all their sinks, writes one manifest (every key-lane's state, every source position),
and only then lets each lane commit. A lane that fails mid-batch breaks the group: no later
checkpoint of this run is taken, and a restart resumes from the last good one.

Event time: a record's watermark is its own source lane's (max event time before it, minus the
allowed lateness), so what is late does not depend on other lanes' speed; a key-lane emits a
window when the minimum over the open source lanes' event times passes its end.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import polars as pl

from streamfn.batch import Batch, Position
from streamfn.contracts import StageRunner
from streamfn.errors import ConfigError, StageError
from streamfn.pipeline import Node
from streamfn.stateful import keyhash
from streamfn.stateful import windowmath as W

if TYPE_CHECKING:
    from streamfn.lane import Lane
    from streamfn.stateful.keygroup import KeyGroup


class KeyLane:
    """Stands in for a lane to a key-lane's stage: rows come from whichever source lane routed them."""

    keyed = True  # stateful.keys: no key-split guard needed, keys are routed here by hash

    def __init__(self, lane: "Lane", stage: str, index: int) -> None:
        self.rt, self.source, self.plan = lane.rt, lane.source, lane.plan
        self.partition = f"~{index}"
        self.id = f"{stage}~{index}"
        self.current: tuple["Lane", pl.DataFrame, pl.Series] | None = None

    def row_offset(self, frame: pl.DataFrame, batch: Batch, index: int) -> tuple[Position, int | None]:
        """The source offset of a routed row: found through its index in the source lane's frame."""
        assert self.current is not None
        lane, source_frame, rows = self.current
        return lane.row_offset(source_frame, batch, int(rows[index]))

    def dead_letter(self, letters: list[Any], *, stage: str) -> None:
        """Dead letters go out through the source lane that routed the rows."""
        assert self.current is not None
        self.current[0].dead_letter(letters, stage=stage)


class Shard:
    """One key-lane: a stage runner holding the state of the keys hashed to it, and its lock."""

    def __init__(self, lane: "Lane", stage: str, index: int, make: Callable[[Any], StageRunner]) -> None:
        self.lock = threading.Lock()
        self.key_lane = KeyLane(lane, stage, index)
        self.runner = make(self.key_lane)


class Exchange:
    """A re-keyed stage: its key-lanes, and the event time of each source lane feeding them."""

    def __init__(self, group: KeyGroup, lane: "Lane", node: Node, keys: list[str],
                 make: Callable[[Any], StageRunner], saved: dict[str, Any] | None) -> None:
        self.group, self.node, self.keys = group, node, keys
        self.shards = [Shard(lane, node.name, k, make) for k in range(group.key_lanes)]
        first = self.shards[0].runner
        self.windowed = hasattr(first, "fold_routed")
        self.on: str = getattr(first, "on", "")
        self.lateness_ms: int = getattr(first, "lateness_ms", 0)
        self.lock = threading.Lock()
        self.lane_max: dict[str, int | None] = {}
        self.finished: set[str] = set()
        self.advanced: int | None = None
        if saved is not None:
            self.restore(saved)

    def snapshot(self, checkpoint_id: str) -> dict[str, Any]:
        """Every key-lane's state and the source lanes' event times."""
        return {"lane_max": dict(self.lane_max),
                "shards": [s.runner.snapshot(checkpoint_id) for s in self.shards]}

    def restore(self, saved: dict[str, Any]) -> None:
        """Load what `snapshot` saved."""
        shards = saved.get("shards") or []
        if len(shards) != len(self.shards):
            raise ConfigError(f"stage {self.node.name!r}: the checkpoint holds {len(shards)} key-lanes, "
                              f"this run has {len(self.shards)}; run with --reset-state to start over")
        self.lane_max = dict(saved.get("lane_max") or {})
        for shard, snap in zip(self.shards, shards):
            if snap is not None:
                shard.runner.restore(snap)

    def event_time_floor(self) -> int | None:
        """The minimum event time over the open source lanes that have not ended (None: unknown)."""
        open_ = [p for p in self.group.open_partitions() if p not in self.finished]
        with self.lock:
            times = [self.lane_max.get(p) for p in open_]
        if not times or any(t is None for t in times):
            return None
        return min(times)  # type: ignore[type-var]

    def advance(self) -> list[pl.DataFrame]:
        """Let every key-lane emit the windows the source lanes' minimum event time closed."""
        target = self.event_time_floor()
        with self.lock:
            if target is None or (self.advanced is not None and target <= self.advanced):
                return []
            self.advanced = target
        outs = []
        for shard in self.shards:
            with shard.lock:
                out = shard.runner.advance_to(target)  # type: ignore[attr-defined]
            if out is not None and out.height:
                outs.append(out)
        return outs


class ExchangeStage(StageRunner):
    """In a source lane: route each batch's rows by key to the stage's key-lanes."""

    def __init__(self, node: Node, lane: "Lane", exchange: Exchange) -> None:
        self.node, self.lane, self.exchange = node, lane, exchange
        exchange.group.attach(lane)

    def process(self, frame: pl.DataFrame, batch: Batch) -> pl.DataFrame | None:
        """Send each row to the key-lane owning its key; return what the key-lanes emitted."""
        if frame.height == 0:
            return None
        ex = self.exchange
        missing = [c for c in (*ex.keys, *([ex.on] if ex.windowed else [])) if c not in frame.columns]
        if missing:
            raise StageError(self.node.name, batch.source, batch.partition, batch.first_offset,
                             f"the stage needs column(s) {missing}; the rows have {frame.columns}")
        marks = self._marks(frame) if ex.windowed else None
        owner = keyhash.owners(frame, ex.keys, len(ex.shards))
        routed = frame.with_columns(owner, pl.int_range(pl.len(), dtype=pl.UInt32).alias("__row"))
        parts = [(int(k[0]), rows) for k, rows in routed.partition_by("__owner", as_dict=True).items()]
        outs: list[pl.DataFrame] = []
        # take free key-lanes first; wait for busy ones after (one lock at a time: no deadlock)
        busy = [(k, rows) for k, rows in parts if not self._run(k, rows, frame, marks, batch, outs, wait=False)]
        for k, rows in busy:
            self._run(k, rows, frame, marks, batch, outs, wait=True)
        if marks is not None:
            self._note_event_time(marks)
            outs += ex.advance()
        return concat_outputs(outs)

    def _marks(self, frame: pl.DataFrame) -> pl.DataFrame:
        """Event time and watermark of each row, from this source lane's order (before routing)."""
        ex = self.exchange
        with ex.lock:
            before = ex.lane_max.get(self.lane.partition)
        return W.lane_marks(frame, ex.on, before, ex.lateness_ms)

    def _note_event_time(self, marks: pl.DataFrame) -> None:
        ex = self.exchange
        with ex.lock:
            now = W.latest(ex.lane_max.get(self.lane.partition), marks)
            if now is not None:
                ex.lane_max[self.lane.partition] = now

    def _run(self, k: int, rows: pl.DataFrame, frame: pl.DataFrame, marks: pl.DataFrame | None,
             batch: Batch, outs: list[pl.DataFrame], *, wait: bool) -> bool:
        shard = self.exchange.shards[k]
        if not shard.lock.acquire(blocking=wait):
            return False
        try:
            index = rows.get_column("__row")
            rows = rows.drop("__owner", "__row")
            shard.key_lane.current = (self.lane, frame, index)
            if marks is not None:
                out = shard.runner.fold_routed(rows, marks[index], batch)  # type: ignore[attr-defined]
            else:
                out = shard.runner.process(rows, batch)
        finally:
            shard.key_lane.current = None
            shard.lock.release()
        if out is not None and out.height:
            outs.append(out)
        return True

    def finish(self) -> pl.DataFrame | None:
        """This source lane ended: the others' event time rules now; the last one emits everything."""
        ex = self.exchange
        with ex.lock:
            ex.finished.add(self.lane.partition)
        if [p for p in ex.group.open_partitions() if p not in ex.finished]:
            return concat_outputs(ex.advance()) if ex.windowed else None
        outs = []
        for shard in ex.shards:
            with shard.lock:
                out = shard.runner.finish()
            if out is not None and out.height:
                outs.append(out)
        return concat_outputs(outs)


def concat_outputs(outs: list[pl.DataFrame | None]) -> pl.DataFrame | None:
    """A stage's outputs as one frame (None and empty ones left out; None: nothing)."""
    frames = [o for o in outs if o is not None and o.height]
    if not frames:
        return None
    return frames[0] if len(frames) == 1 else pl.concat(frames, how="diagonal_relaxed")
