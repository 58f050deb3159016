"""The runtime's observer: cheap hooks the lanes call, and the live state /status reads.

The base `Observer` keeps only what changes rarely (open lanes, lag, checkpoints, dead
letters); its per-batch hooks do nothing, so a run without tracing or metrics pays a few
empty method calls per batch. `streamfn.observe.telemetry.TelemetryObserver` overrides the
per-batch hooks with OpenTelemetry spans and metric points.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from streamfn.summary import NodeStats

if TYPE_CHECKING:
    from streamfn.batch import Batch
    from streamfn.deadletter import DeadLetter
    from streamfn.lane import Lane
    from streamfn.pipeline import Node
    from streamfn.runtime import Runtime


@dataclass(frozen=True, slots=True)
class CheckpointInfo:
    """The last checkpoint one lane committed."""

    checkpoint_id: str
    at: float  # time.time() when it committed
    seconds: float
    size_bytes: int | None


class Observer:
    """Hooks for the runtime and its lanes; this base records no telemetry per batch."""

    telemetry = False

    def __init__(self, runtime: "Runtime") -> None:
        self.rt = runtime
        self.pipeline = runtime.pipeline.name
        self.started_at = time.time()
        self.finished_at: float | None = None
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self._lanes: dict[str, "Lane"] = {}
        self._closed: dict[str, NodeStats] = {}
        self._lag: dict[tuple[str, str], int] = {}
        self._watermarks: dict[str, int] = {}
        self._state_keys: dict[tuple[str, str, str], int] = {}
        self._checkpoints: dict[str, CheckpointInfo] = {}
        self._last_checkpoint: tuple[str, CheckpointInfo] | None = None
        self._dead_letters = 0
        self.engines: dict[str, str] = {}
        self.observation: Any = None  # the streamfn.observe.Observation this observer reports to

    # -- the run ------------------------------------------------------------------------------
    def run_started(self) -> None:
        """The runtime is about to start its sources and sinks."""
        self.started_at = time.time()

    def run_finished(self, error: BaseException | None) -> None:
        """The run ended (every lane closed); flush whatever is buffered."""
        self.finished_at = time.time()
        self.error = error
        if self.observation is not None:
            self.observation.run_finished()

    def lane_opened(self, lane: "Lane") -> None:
        """A lane was opened for a source partition."""
        with self._lock:
            self._lanes[lane.id] = lane
            for name, runner in lane.runners.items():  # the engine each stage runs on (cpu, gpu-cudf...)
                engine = getattr(runner, "engine", None)
                if isinstance(engine, str):
                    self.engines[name] = engine

    def lane_closed(self, lane: "Lane") -> None:
        """A lane closed: fold its counts into the totals and forget its gauges."""
        with self._lock:
            if self._lanes.pop(lane.id, None) is None:
                return
            for name, stats in lane.stats.items():
                self._closed.setdefault(name, NodeStats(stats.kind)).add(stats)
            self._lag.pop((lane.source.name, lane.partition), None)
            self._watermarks.pop(lane.id, None)
            for key in [k for k in self._state_keys if k[2] == lane.id]:
                del self._state_keys[key]

    # -- per batch (no-ops here; TelemetryObserver records spans and metrics) ----------------
    def batch_begin(self, lane: "Lane", batch: "Batch", rejects: int) -> Any:
        """A batch was read and is about to go through the lane's plan."""
        return None

    def batch_end(self, scope: Any) -> None:
        """The batch went through the plan (or the plan raised)."""

    def stage_begin(self, lane: "Lane", node: "Node", batch: "Batch") -> Any:
        """A stage or sink is about to take this batch's frames."""
        return None

    def stage_end(self, scope: Any, lane: "Lane", node: "Node", rows_in: int, rows_out: int,
                  seconds: float) -> None:
        """A stage or sink is done with this batch's frames."""

    # -- rare events ------------------------------------------------------------------------
    def dead_letters(self, letters: Sequence["DeadLetter"]) -> None:
        """Records were sent to the dead-letter sink."""
        with self._lock:
            self._dead_letters += len(letters)

    def checkpoint(self, lane: "Lane", checkpoint_id: str, seconds: float, size_bytes: int | None) -> None:
        """A lane committed: sinks flushed, state saved, source told."""
        info = CheckpointInfo(checkpoint_id, time.time(), seconds, size_bytes)
        with self._lock:
            self._checkpoints[lane.id] = info
            self._last_checkpoint = (lane.id, info)

    def lag(self, source: str, partition: str, lag: int | None) -> None:
        """How many records a partition is behind the end of its source (None: unknown)."""
        with self._lock:
            if lag is None:
                self._lag.pop((source, partition), None)
            else:
                self._lag[(source, partition)] = int(lag)

    def watermark(self, lane: "Lane", watermark_ms: int) -> None:
        """A lane's event-time watermark moved (epoch milliseconds)."""
        with self._lock:
            self._watermarks[lane.id] = watermark_ms

    def state_keys(self, lane: "Lane", stage: str, store: str, keys: int) -> None:
        """How many keys a stage's state store holds in one lane."""
        with self._lock:
            self._state_keys[(stage, store, lane.id)] = keys

    # -- reading ----------------------------------------------------------------------------
    def totals(self) -> dict[str, NodeStats]:
        """Counts per node over every lane of the run, open or closed."""
        out = {n.name: NodeStats(n.kind) for n in self.rt.order}
        with self._lock:
            for name, stats in self._closed.items():
                out.setdefault(name, NodeStats(stats.kind)).add(stats)
            lanes = list(self._lanes.values())
        for lane in lanes:
            for name, stats in list(lane.stats.items()):
                out.setdefault(name, NodeStats(stats.kind)).add(stats)
        return out

    def live(self) -> dict[str, Any]:
        """A consistent copy of the rarely-changing state (lanes, lag, checkpoints...)."""
        with self._lock:
            return {
                "lanes": dict(self._lanes),
                "lag": dict(self._lag),
                "watermarks": dict(self._watermarks),
                "state_keys": dict(self._state_keys),
                "checkpoints": dict(self._checkpoints),
                "last_checkpoint": self._last_checkpoint,
                "dead_letters": self._dead_letters,
            }
