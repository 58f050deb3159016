"""A source's lanes that feed re-keyed stages, checkpointed together (see stateful.exchange).

When to re-key (`needs_exchange`), the `Gate` that lets a checkpoint see every lane between
batches, and the `KeyGroup`: its lanes, its re-keyed stages, and its one manifest per checkpoint
(every lane's position and every key-lane's state at the same cut).
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from streamfn.batch import Position
from streamfn.contracts import StageRunner
from streamfn.errors import ConfigError, GraphError
from streamfn.pipeline import Node
from streamfn.runtime import lane_threads
from streamfn.stateful.exchange import Exchange, ExchangeStage, KeyLane
from streamfn.stateful.keys import KeySplitError
from streamfn.windows import TableSpec

if TYPE_CHECKING:
    from streamfn.lane import Lane
    from streamfn.runtime import Runtime

log = logging.getLogger("streamfn.stateful.keygroup")

GROUP_PARTITION = "#keyed"  # the checkpoint folder of a source's key group (not a partition name)
_GROUPS_ATTR = "_streamfn_key_groups"
_GROUPS_LOCK = threading.Lock()


# -- when to re-key ---------------------------------------------------------------------------
def stage_keys(node: Node) -> list[str] | None:
    """The key of a keyed stage (None for stages whose state is not per key of its input)."""
    if node.operator is not None:
        module, _, spec = node.operator
        return list(spec["by"]) if module in ("windows", "aggregate") else None
    state = node.options.get("state")
    return list(state.key) if isinstance(state, TableSpec) else None


def needs_exchange(rt: "Runtime", source: Node, keys: list[str]) -> bool:
    """Whether rows of `source` must be re-keyed before a stage keyed by `keys`.

    Not when the source declares it is partitioned by (a subset of) the key, nor when a consumer
    group assigns its partitions (other processes read the rest: see stateful.keys), nor when it
    has a single partition and never gains more.
    """
    conn = source.connector
    declared = getattr(conn, "partitioned_by", None)
    if declared and set(declared) <= set(keys):
        return False
    if getattr(conn, "group_assigned", False):
        return False
    return rt.partition_counts.get(source.name, 0) > 1 or bool(getattr(conn, "watch", False))


def group_mode(rt: "Runtime", source: str) -> bool:
    """Whether the lanes of `source` checkpoint together (a stage they feed is re-keyed)."""
    node = rt.sources[source]
    return any((keys := stage_keys(n)) and needs_exchange(rt, node, keys) for n in rt.plans[source])


def keyed_runner(lane: "Lane", node: Node, keys: list[str],
                 make: Callable[[Any], StageRunner]) -> StageRunner:
    """The runner of a keyed stage in a lane: the stage itself, or an exchange to its key-lanes."""
    if isinstance(lane, KeyLane):
        return make(lane)
    if getattr(lane.source.connector, "reads_repartition", False):  # a lane of a repartition topic
        from streamfn.stateful.repartition import RepartitionedStage

        return RepartitionedStage(node, lane, make(lane))
    if not needs_exchange(lane.rt, lane.source, keys):
        _check_declared_key(lane.source, node, keys)
        return make(lane)
    feeding = [name for name, plan in lane.rt.plans.items() if node in plan]
    if len(feeding) > 1:
        raise GraphError(f"stage {node.name!r} is keyed by {keys} and fed by sources {feeding}, none of "
                         "them partitioned by that key; re-keying serves one source: merge the inputs "
                         "into one source, or partition each by the key")
    group = KeyGroup.for_source(lane.rt, lane.source.name)
    return ExchangeStage(node, lane, group.exchange(lane, node, keys, make))


def check_declared_keys(rt: "Runtime") -> None:
    """At the start of a run: refuse keyed stages that a consumer-group source would split."""
    for name, plan in rt.plans.items():
        for node in plan:
            keys = stage_keys(node)
            if keys:
                _check_declared_key(rt.sources[name], node, keys)


def _check_declared_key(source: Node, node: Node, keys: list[str]) -> None:
    """A group-assigned source keyed by another column spreads each key over processes: refuse."""
    declared = getattr(source.connector, "partitioned_by", None)
    if getattr(source.connector, "group_assigned", False) and declared and not set(declared) <= set(keys):
        raise KeySplitError(
            f"stage {node.name!r} is keyed by {keys}, but source {source.name!r} is partitioned by "
            f"{list(declared)} across the processes of its consumer group, so one key's rows would reach "
            "several processes. Re-keying across processes goes through a Kafka repartition topic, and "
            f"this source is not Kafka: key the stage by {list(declared)} (or columns that include them)")


# -- the gate: batches in flight (shared) against a checkpoint (alone) --------------------------
class Gate:
    """A readers-writer gate that lets a waiting checkpoint in before new batches."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._active = 0
        self._writer = False
        self._waiting = 0
        self.broken = False

    def __enter__(self) -> "Gate":
        with self._cond:
            while self._writer or self._waiting:
                self._cond.wait()
            self._active += 1
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        with self._cond:
            self._active -= 1
            if exc_type is not None:  # a batch stopped half-way: key-lanes may hold part of it
                self.broken = True
            self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Wait until no batch is in flight and hold off new ones."""
        with self._cond:
            self._waiting += 1
            while self._writer or self._active:
                self._cond.wait()
            self._waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


# -- a source's lanes and key-lanes, checkpointed together ------------------------------------
class KeyGroup:
    """The lanes of one source that feed re-keyed stages, and those stages' key-lanes."""

    def __init__(self, rt: "Runtime", source: str) -> None:
        self.rt, self.source = rt, source
        self.gate = Gate()
        self.lock = threading.Lock()
        self.lanes: dict[str, "Lane"] = {}
        self.exchanges: dict[str, Exchange] = {}
        checkpointer = rt.checkpointer
        self.saved: dict[str, Any] | None = checkpointer.load_group(source) if checkpointer else None
        self.positions: dict[str, Position] = dict(self.saved["position"]) if self.saved else {}
        wanted = int(rt.settings.get("state.key_lanes") or lane_threads(rt.pipeline))
        self.key_lanes: int = int(self.saved["key_lanes"]) if self.saved else wanted
        if self.key_lanes < 1:
            raise ConfigError(f"state.key_lanes must be at least 1, got {self.key_lanes}")
        if self.saved and wanted != self.key_lanes:
            log.warning("the checkpoint has another number of key-lanes; keeping it", extra={
                "source": source, "key_lanes": self.key_lanes, "setting": wanted})

    @classmethod
    def for_source(cls, rt: "Runtime", source: str) -> "KeyGroup":
        """The run's group of a source (created, and its checkpoint loaded, on first use)."""
        with _GROUPS_LOCK:
            groups = getattr(rt, _GROUPS_ATTR, None)
            if groups is None:
                groups = {}
                setattr(rt, _GROUPS_ATTR, groups)
            if source not in groups:
                groups[source] = cls(rt, source)
            return groups[source]  # type: ignore[no-any-return]

    def resume_position(self, partition: str) -> Position:
        """Where a lane of this source resumes: its position in the group's checkpoint."""
        return self.positions.get(partition)

    def exchange(self, lane: "Lane", node: Node, keys: list[str], make: Callable[[Any], StageRunner]) -> "Exchange":
        """The key-lanes of a stage (made, and restored, by the first lane that asks)."""
        with self.lock:
            if node.name not in self.exchanges:
                saved = (self.saved or {}).get("stages", {}).get(node.name)
                self.exchanges[node.name] = Exchange(self, lane, node, keys, make, saved)
            return self.exchanges[node.name]

    def attach(self, lane: "Lane") -> None:
        """A lane of the source is being built: its batches will hold the gate, its commits are the group's."""
        lane.group, lane.gate = self, self.gate
        if self.rt.checkpointer is None:  # nobody calls restore_lane: admit it now
            self.restore_lane(lane)

    def restore_lane(self, lane: "Lane") -> None:
        """Restore a lane's own (not re-keyed) stateful stages, e.g. a join's table; then admit it.

        Called once the lane is built (by the checkpointer, before its first batch), so a
        checkpoint never sees a lane half-built or not yet restored.
        """
        for name, saved in ((self.saved or {}).get("lanes", {}).get(lane.partition) or {}).items():
            runner = lane.runners.get(name)
            if runner is not None:
                runner.restore(saved)
        with self.gate.exclusive(), self.lock:
            self.lanes[lane.partition] = lane
            for ex in self.exchanges.values():
                ex.finished.discard(lane.partition)

    def detach(self, lane: "Lane") -> None:
        """A lane closed: remember its position, stop counting it in the event-time minimum."""
        with self.gate.exclusive():
            with self.lock:
                if self.lanes.get(lane.partition) is lane:
                    del self.lanes[lane.partition]
                    self.positions[lane.partition] = lane.position

    def open_partitions(self) -> list[str]:
        """The partitions of the lanes now open."""
        with self.lock:
            return list(self.lanes)

    def checkpoint(self, caller: "Lane") -> None:
        """Between batches of every lane: flush all sinks, save one manifest, then commit each lane."""
        with self.gate.exclusive():
            if self.gate.broken:
                log.warning("a lane failed mid-batch: no checkpoint of the re-keyed state is taken; a "
                            "restart resumes from the last one", extra={"lane": caller.id})
                return
            with self.lock:
                lanes = list(self.lanes.values())
            checkpoint_id = self.rt.next_checkpoint_id()
            started = time.perf_counter()
            for lane in lanes:
                lane.flush(checkpoint_id)
                self.positions[lane.partition] = lane.position
            saved = self.rt.checkpointer.save_group(self, checkpoint_id) if self.rt.checkpointer else None
            for lane in lanes:
                lane.committed(checkpoint_id, started, saved)

    def snapshot(self, checkpoint_id: str) -> dict[str, Any]:
        """What the group's manifest holds (taken while no batch is in flight)."""
        lanes: dict[str, dict[str, Any]] = {}
        with self.lock:
            open_lanes = list(self.lanes.values())
        for lane in open_lanes:
            own = {name: snap for name, runner in lane.runners.items()
                   if not isinstance(runner, ExchangeStage) and (snap := runner.snapshot(checkpoint_id)) is not None}
            if own:
                lanes[lane.partition] = own
        return {"key_lanes": self.key_lanes, "position": dict(self.positions), "lanes": lanes,
                "stages": {name: ex.snapshot(checkpoint_id) for name, ex in self.exchanges.items()}}
