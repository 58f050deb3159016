"""Which lane owns which key: state must live in exactly one lane per key.

Lanes are source partitions. A source that is not partitioned by a stage's key is re-keyed in
this process (streamfn.stateful.exchange: key-lanes chosen by a stable hash), or, when it is a
Kafka topic declared keyed by another column, through a repartition topic
(streamfn.stateful.repartition). Per-lane state remains where the source says it is
partitioned by the key (`partitioned_by`, a Kafka topic's key=) or where a consumer group
assigns partitions across processes and declares no key, which an in-process exchange cannot
re-key. This guard notices when, there, the same key arrives in two
lanes of this process and stops the run with a clear message instead of emitting split windows.
"""
from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import polars as pl

from streamfn.errors import ConfigError

if TYPE_CHECKING:
    from streamfn.lane import Lane

_REGISTRY_ATTR = "_streamfn_key_owners"
_REGISTRY_LOCK = threading.Lock()


class KeySplitError(ConfigError):
    """The same key reached a keyed stage through two lanes."""


class KeyOwners:
    """The key hashes each lane has seen, for one stage, shared by the lanes of one run."""

    def __init__(self, stage: str, keys: list[str]) -> None:
        self.stage, self.keys = stage, keys
        self._lock = threading.Lock()
        self._by_lane: dict[str, set[int]] = {}

    @classmethod
    def for_stage(cls, lane: "Lane", stage: str, keys: list[str]) -> "KeyOwners":
        """The run-wide registry of a stage (created by the first lane that asks)."""
        if getattr(lane, "keyed", False):  # a key-lane: keys reach it by hash, never split
            return _Unguarded(stage, keys)
        with _REGISTRY_LOCK:
            registry = getattr(lane.rt, _REGISTRY_ATTR, None)
            if registry is None:
                registry = {}
                setattr(lane.rt, _REGISTRY_ATTR, registry)
            owners = registry.get(stage)
            if owners is None:
                owners = registry[stage] = cls(stage, keys)
            return owners

    def claim(self, frame: pl.DataFrame, lane_id: str) -> None:
        """Record the keys of these rows for a lane; raise if another lane already has one."""
        hashes = frame.select(self._hash().unique()).to_series().to_list()
        with self._lock:
            mine = self._by_lane.setdefault(lane_id, set())
            fresh = set(hashes) - mine
            if not fresh:
                return
            for other, theirs in self._by_lane.items():
                if other != lane_id and not fresh.isdisjoint(theirs):
                    self._fail(frame, lane_id, other, fresh & theirs)
            mine |= fresh

    def _hash(self) -> pl.Expr:
        key = pl.col(self.keys[0]) if len(self.keys) == 1 else pl.struct(self.keys)
        return key.hash(seed=0)

    def release(self, lane_id: str) -> None:
        """Forget a closed lane's keys (its partition may reopen elsewhere)."""
        with self._lock:
            self._by_lane.pop(lane_id, None)

    def _fail(self, frame: pl.DataFrame, lane_id: str, other: str, shared: set[int]) -> None:
        hashed = frame.with_columns(self._hash().alias("__h"))
        example = hashed.filter(pl.col("__h").is_in(list(shared)[:1])).select(self.keys).row(0)
        raise KeySplitError(
            f"stage {self.stage!r}: key {example} arrives in lanes {other} and {lane_id}; keyed state "
            f"must live in one lane per key, and this source's partitions are assigned across processes "
            f"(a consumer group), so it cannot be re-keyed in this process: declare the column the topic "
            "is keyed by (kafka.topic(..., key=...)) and the stage reads a repartition topic keyed by "
            f"{self.keys}, or produce the topic keyed by {self.keys[0]!r}")


class _Unguarded(KeyOwners):
    """No guard: a key-lane of a re-keyed stage."""

    def claim(self, frame: pl.DataFrame, lane_id: str) -> None:
        """Nothing to check."""

    def release(self, lane_id: str) -> None:
        """Nothing to forget."""
