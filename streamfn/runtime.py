"""The local runtime: lanes on a thread pool, commits, shutdown, and the run's summary."""
from __future__ import annotations

import heapq
import importlib
import itertools
import logging
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping
from types import FrameType
from typing import Any

from streamfn.batch import Batch, Position
from streamfn.context import RunContext
from streamfn.contracts import Sink, Source
from streamfn.deadletter import DeadLetter, dead_letter_frame
from streamfn.errors import ConfigError, DeadLetterLimit, StreamfnError
from streamfn.gpu import check_pipeline as check_gpu_stages
from streamfn.lane import DONE, IDLE, Lane
from streamfn.observe import observer_for
from streamfn.pipeline import Node, Pipeline
from streamfn.summary import NodeStats, RunSummary

log = logging.getLogger("streamfn.runtime")

_MAX_IDLE_BACKOFF_S = 0.02
UNBOUNDED = object()  # a lane may restore its latest checkpoint


class Runtime:
    """Runs one pipeline in this process."""

    def __init__(self, pipeline: Pipeline, *, until_idle: bool, settings: Mapping[str, str],
                 handle_signals: bool = True, observe: Mapping[str, Any] | None = None) -> None:
        self.pipeline = pipeline
        self.observe_options = dict(observe or {})
        self.until_idle = until_idle
        self.settings = dict(settings)
        self.handle_signals = handle_signals
        self.order = pipeline.validate()
        self.batch_rows = pipeline.batch_rows
        self.sources: dict[str, Node] = {n.name: n for n in self.order if n.kind == "source"}
        self.plans = {name: self._plan(node) for name, node in self.sources.items()}
        if any(n.operator is not None or n.options.get("state") is not None for n in self.order):
            # a keyed stage its Kafka source is not partitioned for reads a repartition topic
            importlib.import_module("streamfn.stateful.repartition").rewrite(self)
        self._check_connectors_used_once()
        self.dead_letter_sink = pipeline.dead_letter_sink or _default_dead_letter_sink(pipeline)
        self.shared_dlq_writer = self.dead_letter_sink.for_lane("runtime")
        self.ctx = RunContext(self)
        self.checkpointer: Any = None  # streamfn.stateful.checkpoint.Checkpointer when state is kept
        self.stopping = False
        self.stopped_by = "end of input"
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._lanes: dict[tuple[str, str], Lane] = {}
        self._ready: deque[Lane] = deque()
        self._sleeping: list[tuple[float, int, Lane]] = []
        self._running: set[Lane] = set()
        self._seq = itertools.count()
        self._finished = threading.Event()
        self._lane_done = threading.Event()  # wakes the main thread to check for the end at once
        self._totals: dict[str, NodeStats] = {n.name: NodeStats(n.kind) for n in self.order}
        self._dead_letters = 0
        self._lanes_opened = 0
        self.partition_counts: dict[str, int] = {}  # per source: partitions listed at the start
        self._checkpoints = itertools.count(1)
        self._run_started_ms = int(time.time() * 1000)
        self.observer = observer_for(self)  # streamfn.observe: no-op per batch unless telemetry is on

    def _plan(self, source: Node) -> list[Node]:
        reachable = {source.name}
        plan = []
        for node in self.order:
            if node.kind != "source" and any(u.name in reachable for u in node.upstreams):
                reachable.add(node.name)
                plan.append(node)
        if not plan:
            log.warning("source feeds nothing", extra={"pipeline": self.pipeline.name, "source": source.name})
        return plan

    def _check_connectors_used_once(self) -> None:
        seen: dict[int, str] = {}
        for node in self.order:
            if node.connector is not None:
                other = seen.setdefault(id(node.connector), node.name)
                if other != node.name:
                    raise ConfigError(f"nodes {other!r} and {node.name!r} share one connector object; "
                                      "create one connector per node")

    # -- the run ------------------------------------------------------------------------------
    def run(self) -> RunSummary:
        """Start every source and sink, run the lanes to the end, and summarise."""
        started = time.perf_counter()
        log.info("run starting", extra={"pipeline": self.pipeline.name, "until_idle": self.until_idle})
        check_gpu_stages(self.order, self.pipeline.name)  # engine="gpu" without a GPU fails before anything starts
        restore = self._install_signal_handlers()
        started_sinks: list[Sink] = []
        started_sources: list[Source] = []
        threads: list[threading.Thread] = []
        try:
            self.observer.run_started()
            self.checkpointer = _load_checkpointer(self)
            for node in self.order:
                if node.kind == "sink":
                    assert isinstance(node.connector, Sink)
                    node.connector.start(self.ctx)
                    started_sinks.append(node.connector)
            self.dead_letter_sink.start(self.ctx)
            started_sinks.append(self.dead_letter_sink)
            for node in self.sources.values():
                assert isinstance(node.connector, Source)
                node.connector.start(self.ctx)
                started_sources.append(node.connector)
                partitions = node.connector.partitions()
                self.partition_counts[node.name] = len(partitions)  # several: keyed state may be re-keyed
                self.add_partitions(node.connector, partitions)
            for i in range(lane_threads(self.pipeline)):
                thread = threading.Thread(target=self._worker, name=f"streamfn-lane-{i}", daemon=True)
                thread.start()
                threads.append(thread)
            while not self._finished.is_set():
                self._lane_done.wait(0.05)
                self._lane_done.clear()
                self._check_finished()
        except BaseException as exc:
            self.fail(exc)
            raise
        finally:
            self.stop("error" if self.error else self.stopped_by)
            for thread in threads:
                thread.join()
            try:
                self._close_all(started_sources, started_sinks)
                restore()
            finally:  # even when closing failed: /status must not say "stopping" forever
                self.observer.run_finished(self.error or sys.exc_info()[1])
        if self.error is not None:
            raise self.error
        summary = RunSummary(self.pipeline.name, self._totals, self._dead_letters,
                             getattr(self.dead_letter_sink, "url", None), self._lanes_opened,
                             time.perf_counter() - started, self.stopped_by)
        log.info("run finished", extra={"pipeline": self.pipeline.name, "wall_s": round(summary.wall_s, 3),
                                        "dead_letters": summary.dead_letters})
        return summary

    def _close_all(self, sources: list[Source], sinks: list[Sink]) -> None:
        for lane in list(self._lanes.values()):  # lanes a failure left open
            if not lane.closed.is_set():
                try:
                    lane.close(commit=False)
                except Exception:
                    log.exception("closing a lane failed", extra={"lane": lane.id})
        for source in sources:
            source.stop()
        try:
            self.shared_dlq_writer.flush(self.next_checkpoint_id())
        except Exception as exc:
            self.fail(exc)
        for sink in sinks:
            sink.close()

    def stop(self, reason: str) -> None:
        """Ask every lane to finish its batch, commit and close."""
        with self._cond:
            if not self.stopping:
                self.stopping = True
                self.stopped_by = reason
                log.info("stopping", extra={"pipeline": self.pipeline.name, "reason": reason})
            while self._sleeping:
                self._ready.append(heapq.heappop(self._sleeping)[2])
            self._cond.notify_all()

    def fail(self, exc: BaseException) -> None:
        """Record the first fatal error and stop the run."""
        with self._cond:
            if self.error is None:
                self.error = exc
        self.stop("error")

    def _check_finished(self) -> None:
        """Called by the main thread only: sources answer exhausted() one caller at a time."""
        with self._cond:
            if self._lanes or self._running:
                return
        # Asked without the lock: a source may open new lanes while answering.
        if self.stopping or all(n.connector.exhausted() for n in self.sources.values()):  # type: ignore[union-attr]
            with self._cond:
                if not self._lanes and not self._running:
                    self._finished.set()
                    self._cond.notify_all()

    def _install_signal_handlers(self) -> Any:
        if not self.handle_signals or threading.current_thread() is not threading.main_thread():
            return lambda: None

        def on_signal(signum: int, frame: FrameType | None) -> None:
            name = signal.Signals(signum).name
            if self.stopping:
                raise KeyboardInterrupt(f"second {name}")
            log.info("signal received; finishing the batches in flight", extra={"signal": name})
            self.stop(f"signal {name}")

        old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        return lambda: [signal.signal(s, h) for s, h in old.items()]

    # -- scheduling ---------------------------------------------------------------------------
    def _worker(self) -> None:
        while True:
            with self._cond:
                lane = None
                while lane is None:
                    if self._finished.is_set():
                        return
                    now = time.monotonic()
                    while self._sleeping and self._sleeping[0][0] <= now:
                        self._ready.append(heapq.heappop(self._sleeping)[2])
                    if self._ready:
                        lane = self._ready.popleft()
                        self._running.add(lane)
                        break
                    timeout = self._sleeping[0][0] - now if self._sleeping else 0.1
                    self._cond.wait(timeout)
            try:
                result = lane.step()
            except BaseException as exc:
                # streamfn's own errors are one clear line; anything else is a bug worth a traceback
                log.error("lane failed", exc_info=not isinstance(exc, StreamfnError),
                          extra={"lane": lane.id, "error": f"{type(exc).__name__}: {exc}"})
                self.fail(exc)
                result = DONE
                try:
                    lane.close(commit=False)
                except Exception:
                    log.exception("closing a failed lane failed", extra={"lane": lane.id})
            self._after_step(lane, result)

    def _after_step(self, lane: Lane, result: str) -> None:
        with self._cond:
            self._running.discard(lane)
            if result == DONE:
                self._lanes.pop((lane.source.name, lane.partition), None)
                for name, stats in lane.stats.items():
                    self._totals[name].add(stats)
                self._lane_done.set()
            elif result == IDLE and not (self.stopping or lane.revoke_requested):
                lane.backoff_s = min(max(lane.backoff_s * 2, 0.001), _MAX_IDLE_BACKOFF_S)
                heapq.heappush(self._sleeping, (time.monotonic() + lane.backoff_s, next(self._seq), lane))
            else:
                lane.backoff_s = 0.0
                self._ready.append(lane)
            self._cond.notify()

    def _source_node(self, source: Source) -> Node:
        for node in self.sources.values():
            if node.connector is source:
                return node
        raise StreamfnError(f"{source.describe()} is not a source of pipeline {self.pipeline.name!r}")

    def add_partitions(self, source: Source, partitions: Mapping[str, Position] | Iterable[str]) -> None:
        node = self._source_node(source)
        given = partitions if isinstance(partitions, Mapping) else dict.fromkeys(partitions)
        for partition, resume in given.items():
            if (node.name, partition) in self._lanes:
                continue
            if self.checkpointer is not None:  # the state was saved at this position: it wins
                saved = self.checkpointer.resume_position(node.name, partition, self._bound(node, partition))
                resume = resume if saved is None else saved
            lane = Lane(self, node, partition, source.open(partition, resume), self.plans[node.name])
            if self.checkpointer is not None:
                self.checkpointer.restore_lane(lane)
            with self._cond:
                self._lanes[(node.name, partition)] = lane
                self._lanes_opened += 1
                self._ready.append(lane)
                self._cond.notify()
            log.info("lane opened", extra={"lane": lane.id, "offset": lane.position})

    def _bound(self, node: Node, partition: str) -> Any:
        """The latest position a lane may restore: its source's committed offset, when a sink of the
        lane commits that offset in a transaction after the checkpoint (else no bound)."""
        source: Source = node.connector  # type: ignore[assignment]
        if source.offsets_in_transactions and any(
                n.kind == "sink" and n.connector.transactional for n in self.plans[node.name]):  # type: ignore[union-attr]
            return source.committed_position(partition)
        return UNBOUNDED

    def remove_partitions(self, source: Source, partitions: Iterable[str], timeout_s: float) -> dict[str, Position]:
        node = self._source_node(source)
        lanes = []
        with self._cond:
            for partition in partitions:
                lane = self._lanes.get((node.name, partition))
                if lane is not None:
                    lane.revoke_requested = True
                    lanes.append(lane)
            self._sleeping = [entry for entry in self._sleeping if entry[2] not in lanes]
            heapq.heapify(self._sleeping)
            self._ready.extend(lane for lane in lanes if lane not in self._ready and lane not in self._running)
            self._cond.notify_all()
        deadline = time.monotonic() + timeout_s
        for lane in lanes:
            if not lane.closed.wait(max(0.0, deadline - time.monotonic())):
                raise StreamfnError(f"lane {lane.id} did not close within {timeout_s:g}s after its "
                                    "partition was revoked")
        return {lane.partition: lane.position for lane in lanes}

    def others_done(self, source: Source) -> bool:
        """Whether every source but this one has no open lane and will open none."""
        return self.sources_done(node.connector for node in self.sources.values()  # type: ignore[misc]
                                 if node.connector is not source)

    def sources_done(self, sources: Iterable[Source]) -> bool:
        """Whether these sources have no open lane and will open none."""
        names = [self._source_node(source).name for source in sources]
        with self._cond:
            open_sources = {name for name, _ in self._lanes}
        return all(name not in open_sources and self.sources[name].connector.exhausted()  # type: ignore[union-attr]
                   for name in names)

    def wake(self, source: Source, partition: str) -> None:
        node = self._source_node(source)
        with self._cond:
            lane = self._lanes.get((node.name, partition))
            if lane is None or lane in self._ready or lane in self._running:
                return
            before = len(self._sleeping)
            self._sleeping = [entry for entry in self._sleeping if entry[2] is not lane]
            if len(self._sleeping) != before:
                heapq.heapify(self._sleeping)
                lane.backoff_s = 0.0
                self._ready.append(lane)
                self._cond.notify()

    # -- shared services ----------------------------------------------------------------------
    def next_checkpoint_id(self) -> str:
        """A new checkpoint id, sortable within and across runs."""
        return f"{self._run_started_ms:013d}-{next(self._checkpoints):08d}"

    def save_checkpoint(self, lane: Lane, checkpoint_id: str) -> Any:
        """Save the lane's state and position, when the pipeline keeps checkpoints."""
        if self.checkpointer is not None:
            return self.checkpointer.save_lane(lane, checkpoint_id)  # bytes written, if it says
        return None

    def count_dead_letters(self, n: int) -> None:
        """Count failed records; stop the run past the pipeline's limit."""
        with self._lock:
            self._dead_letters += n
            total = self._dead_letters
        limit = self.pipeline.max_dead_letters
        if limit is not None and total > limit:
            raise DeadLetterLimit(f"{total} records failed, more than max_dead_letters={limit}; "
                                  f"stopping (see the dead letters for the reasons)")

    def write_dead_letters(self, writer: Sink, letters: list[DeadLetter], lane: str) -> None:
        """Write failed records to a dead-letter writer, as one batch."""
        self.observer.dead_letters(letters)
        frame = dead_letter_frame(self.pipeline.name, letters)
        batch = Batch(frame, "dead_letters", lane)
        if writer is self.shared_dlq_writer:
            with self._lock:
                writer.write(batch)
        else:
            writer.write(batch)
        first = letters[0]
        log.warning("dead letters written", extra={
            "count": len(letters), "stage": first.stage, "source": first.source,
            "partition": first.partition, "offset": first.offset, "error": first.error})


def lane_threads(pipeline: Pipeline) -> int:
    """The pipeline's lane threads: its own setting, else twice the CPUs and at least 4 (a lane
    also waits on I/O: files, brokers; and polars runs without the GIL)."""
    return pipeline.threads or max(4, 2 * (os.cpu_count() or 2))


def _default_dead_letter_sink(pipeline: Pipeline) -> Sink:
    files = importlib.import_module("streamfn.connectors.files")
    return files.ndjson(os.path.join(pipeline.run_dir, "dead_letters"))  # type: ignore[no-any-return]


def _load_checkpointer(runtime: Runtime) -> Any:
    """The checkpoint store of streamfn.stateful, when the pipeline keeps state or asks for one."""
    stateful = any(n.operator is not None or n.options.get("state") is not None for n in runtime.order)
    if runtime.pipeline.checkpoint is None and not stateful:
        return None
    checkpoint = importlib.import_module("streamfn.stateful.checkpoint")
    return checkpoint.Checkpointer.for_runtime(runtime)
