"""Samples a run's counters on a timer and builds the status document (/status, progress view)."""
from __future__ import annotations

import threading
import time
from collections import deque
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from streamfn.observe import Observation

_RATE_WINDOW_S = 5.0  # rates are averaged over about this long


def _iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds")


class Monitor:
    """Keeps recent samples of rows per node to turn counts into rates."""

    def __init__(self, observation: "Observation", *, interval_s: float = 1.0) -> None:
        self.observation = observation
        self.interval_s = interval_s
        self._samples: deque[tuple[float, dict[str, tuple[int, int]]]] = deque(
            maxlen=max(3, int(_RATE_WINDOW_S / interval_s) + 2))
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start sampling on a background thread (once)."""
        with self._lock:
            self._samples.clear()
            if self._thread is None:
                self._stop.clear()
                self._thread = threading.Thread(target=self._loop, name="streamfn-monitor", daemon=True)
                self._thread.start()
        self.sample()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def close(self) -> None:
        """Stop sampling."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def sample(self) -> None:
        """Take one sample of the run's counters."""
        observer = self.observation.observer
        if observer is None:
            return
        counts = {name: (s.rows_in, s.rows_out) for name, s in observer.totals().items()}
        with self._lock:
            self._samples.append((time.monotonic(), counts))

    def rates(self) -> dict[str, tuple[float, float]]:
        """Rows in and out per second per node, over the last few seconds."""
        with self._lock:
            if len(self._samples) < 2:
                return {}
            t1, last = self._samples[-1]
            t0, first = next(((t, c) for t, c in self._samples if t1 - t <= _RATE_WINDOW_S), self._samples[-2])
        if t1 <= t0:
            return {}
        dt = t1 - t0
        return {name: ((cur[0] - first.get(name, (0, 0))[0]) / dt, (cur[1] - first.get(name, (0, 0))[1]) / dt)
                for name, cur in last.items()}

    def status(self) -> dict[str, Any]:
        """The status document: state, health, per-node counts and rates, partitions, checkpoints."""
        obs = self.observation
        observer, runtime = obs.observer, obs.runtime
        if observer is None or runtime is None:
            return {"pipeline": obs.pipeline.name, "state": "starting", "health": "ok", "nodes": [],
                    "partitions": [], "dead_letters": 0, "last_checkpoint": None}
        now = time.time()
        live = observer.live()
        rates = self.rates()
        totals = observer.totals()
        nodes = []
        for node in runtime.order:
            stats = totals[node.name]
            rate_in, rate_out = rates.get(node.name, (0.0, 0.0))
            nodes.append({
                "name": node.name, "kind": node.kind, "upstreams": [u.name for u in node.upstreams],
                "engine": (observer.engines.get(node.name) or node.options.get("engine")) if node.kind == "stage"
                else None,
                "describe": node.connector.describe() if node.connector is not None else None,
                "rows_in": stats.rows_in, "rows_out": stats.rows_out, "errors": stats.errors,
                "batches": stats.batches, "seconds": round(stats.seconds, 6),
                "rows_in_per_s": round(rate_in, 3), "rows_out_per_s": round(rate_out, 3),
            })
        return {
            "pipeline": runtime.pipeline.name,
            "state": _state(observer, runtime),
            "health": "failed" if (observer.error or runtime.error) else "ok",
            "error": str(observer.error or runtime.error) if (observer.error or runtime.error) else None,
            "stopped_by": runtime.stopped_by if runtime.stopping else None,
            "started_at": _iso(observer.started_at), "now": _iso(now),
            "uptime_s": round((observer.finished_at or now) - observer.started_at, 3),
            "dead_letters": live["dead_letters"],
            "lanes_open": len(live["lanes"]),
            "nodes": nodes,
            "partitions": _partitions(live, now),
            "lag_total": sum(live["lag"].values()) if live["lag"] else None,
            "last_checkpoint": _checkpoint(live["last_checkpoint"], now),
        }


def _state(observer: Any, runtime: Any) -> str:
    if observer.error or runtime.error:
        return "failed"
    if observer.finished_at is not None:
        return "finished"
    return "stopping" if runtime.stopping else "running"


def _checkpoint(entry: Any, now: float) -> dict[str, Any] | None:
    if entry is None:
        return None
    lane, info = entry
    return {"id": info.checkpoint_id, "lane": lane, "age_s": round(now - info.at, 3),
            "seconds": round(info.seconds, 6), "bytes": info.size_bytes}


def _partitions(live: dict[str, Any], now: float) -> list[dict[str, Any]]:
    out = []
    for lane_id, lane in sorted(live["lanes"].items()):
        position = lane.position
        checkpoint = live["checkpoints"].get(lane_id)
        watermark = live["watermarks"].get(lane_id)
        out.append({
            "lane": lane_id, "source": lane.source.name, "partition": lane.partition,
            "position": position if isinstance(position, (int, str)) or position is None else str(position),
            "lag": live["lag"].get((lane.source.name, lane.partition)),
            "rows": lane.stats[lane.source.name].rows_out,
            "watermark": watermark,
            "checkpoint_id": checkpoint.checkpoint_id if checkpoint else None,
            "checkpoint_age_s": round(now - checkpoint.at, 3) if checkpoint else None,
        })
    return out
