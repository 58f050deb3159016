"""What the poller hands a lane: slices of one partition's messages, reduced to plain values.

Message objects are tracked by Python's cyclic GC; holding hundreds of thousands of them in
queues makes every collection walk them (a third of the consumer's CPU in a profile). So the
poller keeps only values (bytes, untracked), the first offset, and offsets or metadata when
they are needed.
"""
from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, replace
from typing import Any

from streamfn.observe.tracing import tracing_active

# metadata a source can add as columns; the poller extracts only what was asked for
INCLUDE = ("key", "partition", "offset", "timestamp", "headers")


@dataclass(frozen=True, slots=True)
class Chunk:
    """Consecutive messages of one partition (values may be None: tombstones), or an end-of-partition mark."""

    values: list[bytes | None]
    first: int  # offset of the first message (for an end mark: the next offset to read)
    offsets: list[int] | None = None  # None: first, first + 1, ... (no gaps)
    meta: dict[str, list[Any]] | None = None
    eof: bool = False
    traces: frozenset[bytes] = frozenset()  # distinct `traceparent` headers, read only when traced

    def offset(self, index: int) -> int:
        """The offset of the message at `index`."""
        return self.offsets[index] if self.offsets is not None else self.first + index

    def next_offset(self) -> int:
        """The offset after the last message (where reading continues)."""
        return self.first if self.eof else self.offset(len(self.values) - 1) + 1

    def split(self, n: int) -> tuple["Chunk", "Chunk"]:
        """The first n messages, and the rest."""
        meta_a = {k: v[:n] for k, v in self.meta.items()} if self.meta else None
        meta_b = {k: v[n:] for k, v in self.meta.items()} if self.meta else None
        offs = self.offsets
        head = replace(self, values=self.values[:n], offsets=offs[:n] if offs else None, meta=meta_a)
        tail = replace(self, values=self.values[n:], first=self.offset(n), offsets=offs[n:] if offs else None,
                       meta=meta_b)
        return head, tail


def make_chunk(messages: list[Any], include: tuple[str, ...]) -> Chunk:
    """A chunk from consecutive data messages of one partition (no error events among them)."""
    values = [m.value() for m in messages]
    first, last = messages[0].offset(), messages[-1].offset()
    offsets = None if last - first + 1 == len(messages) else [m.offset() for m in messages]
    meta = {what: _metadata(what, messages) for what in include} if include else None
    traces = frozenset(v for m in messages for k, v in (m.headers() or ()) if k == "traceparent" and v) \
        if tracing_active() else frozenset()
    return Chunk(values, first, offsets, meta, traces=traces)


def _metadata(what: str, messages: list[Any]) -> list[Any]:
    if what == "key":
        return [m.key() for m in messages]
    if what == "partition":
        return [m.partition() for m in messages]
    if what == "offset":
        return [m.offset() for m in messages]
    if what == "timestamp":
        return [m.timestamp()[1] for m in messages]
    return [[{"key": k, "value": v} for k, v in (m.headers() or [])] for m in messages]


class PartitionQueue:
    """Chunks of one partition waiting for its lane; bounded by the poller pausing the partition."""

    def __init__(self, topic: str, partition: int, name: str) -> None:
        self.topic, self.partition, self.name = topic, partition, name
        self.lock = threading.Lock()
        self.chunks: deque[Chunk] = deque()
        self.queued = 0
        self.paused = False
        self.ended = False  # the lane raised EndOfInput (until-idle)
        self.lost = False  # the group gave it to another member without a revoke: do not commit
        self.target: int | None = None  # the high watermark to read up to (until-idle)

    def put(self, chunk: Chunk) -> None:
        with self.lock:
            self.chunks.append(chunk)
            self.queued += len(chunk.values)

    def take(self, max_rows: int) -> list[Chunk]:
        """Chunks holding up to max_rows messages, oldest first."""
        out: list[Chunk] = []
        taken = 0
        with self.lock:
            while self.chunks and taken < max_rows:
                chunk = self.chunks.popleft()
                if len(chunk.values) > max_rows - taken:
                    chunk, rest = chunk.split(max_rows - taken)
                    self.chunks.appendleft(rest)
                out.append(chunk)
                taken += len(chunk.values)
            self.queued -= taken
        return out
