"""A lane's reader of one assigned Kafka partition: blocks of messages from its queue, parsed at once."""
from __future__ import annotations

import bisect
import itertools
import logging
from typing import TYPE_CHECKING, Any

import polars as pl

from streamfn.batch import Position
from streamfn.connectors.kafka.topics import kafka
from streamfn.contracts import Reject, SourcePartition
from streamfn.errors import EndOfInput, StreamfnError
from streamfn.observe.tracing import extract_context, set_batch_contexts, tracing_active

from streamfn.connectors.kafka.chunks import Chunk, PartitionQueue

if TYPE_CHECKING:
    from streamfn.connectors.kafka.source import SourceSide

log = logging.getLogger("streamfn.kafka")

# commit errors that mean "this member no longer owns the partition": the new owner re-reads
_COMMIT_LOST = {"REBALANCE_IN_PROGRESS", "ILLEGAL_GENERATION", "UNKNOWN_MEMBER_ID", "_STATE", "_NO_OFFSET",
                "_ASSIGNMENT_LOST", "FENCED_INSTANCE_ID"}


class KafkaPartition(SourcePartition):
    """One assigned partition, read from its queue in blocks."""

    def __init__(self, side: SourceSide, queue: PartitionQueue, start: int | None) -> None:
        self.side = side
        self.queue = queue
        self._position = start
        self._eof = False
        self._rejects: list[Reject] = []
        self._closed = False

    def next_batch(self, max_rows: int) -> pl.DataFrame | None:
        self.side.check()
        chunks = self.queue.take(max_rows)
        if not chunks:
            if self.side.owner.ending() and self._at_end():
                self.queue.ended = True
                raise EndOfInput()
            return None
        data = []
        for chunk in chunks:
            self._eof = chunk.eof  # an end mark counts only if no message came after it
            if chunk.eof:
                if self._position is None or chunk.first > self._position:
                    self._position = chunk.first
            elif chunk.values:
                data.append(chunk)
                self._position = chunk.next_offset()
        if not data:
            return None
        if tracing_active():  # the batch's span continues the traces its messages carry
            carried = set().union(*(c.traces for c in data))
            set_batch_contexts(extract_context([("traceparent", t)]) for t in carried)
        values = data[0].values if len(data) == 1 else [v for c in data for v in c.values]
        if None in values and self.side.owner.format != "raw":  # tombstones: rejected as empty values
            values = [b"" if v is None else v for v in values]
        frame, rejected, rows = self.side.decoder.decode(values)  # type: ignore[arg-type]
        bad = set()
        if rejected:
            starts = list(itertools.accumulate((len(c.values) for c in data), initial=0))
            for index, reason in rejected:
                k = bisect.bisect_right(starts, index) - 1
                self._rejects.append(Reject(data[k].offset(index - starts[k]), values[index] or b"", reason))
                bad.add(index)
        if self.side.owner.include:
            frame = self._with_metadata(frame, data, bad, rows)
        return frame

    def _at_end(self) -> bool:
        ends_by_marks = self.side.owner.ends_by_marks  # a repartition topic: its writers' end marks
        if ends_by_marks is not None:
            return ends_by_marks(self.queue.name)
        readback = self.side.owner.readback  # a topic this run writes ends after its writers
        if readback is not None and readback.covers(self.queue.topic):
            return readback.at_end(self.side, self.queue, self._position, self._eof)
        if self._eof:
            return True
        target = self.queue.target
        return target is not None and self._position is not None and self._position >= target

    def _with_metadata(self, frame: pl.DataFrame, data: list[Chunk], bad: set[int],
                       rows: list[int] | None) -> pl.DataFrame:
        columns: dict[str, pl.Series] = {}
        for what in self.side.owner.include:
            values = [v for c in data for v in (c.meta or {}).get(what, [])]
            if bad:
                values = [v for i, v in enumerate(values) if i not in bad]
            columns[f"kafka_{what}"] = _series(what, values)
        meta = pl.DataFrame(columns)
        if rows is not None:  # Arrow: one message holds many rows
            meta = meta.select(pl.all().repeat_by(pl.Series(rows, dtype=pl.UInt32)).explode()) if rows else meta
        return pl.concat([frame, meta.slice(0, frame.height)], how="horizontal")

    def position(self) -> Position:
        return self._position

    def take_rejects(self) -> list[Reject]:
        rejects, self._rejects = self._rejects, []
        return rejects

    def commit(self, position: Position) -> None:
        """Commit the group offset (the next offset to read) of this partition."""
        if position is None or self.queue.lost or self.side.consumer is None:
            return
        tp = kafka().TopicPartition(self.queue.topic, self.queue.partition, int(position))
        try:
            self.side.call(lambda consumer: consumer.commit(offsets=[tp], asynchronous=False))
        except kafka().KafkaException as exc:
            error = exc.args[0]
            if error.name() not in _COMMIT_LOST:
                raise StreamfnError(f"committing offset {position} of {self.queue.name} failed: {error.str()}") from exc
            log.warning("offset commit refused (the partition moved to another worker); its records after the "
                        "last commit will be read again there", extra={"partition": self.queue.name,
                                                                        "offset": position, "error": error.str()})

    def close(self) -> None:
        self._closed = True


def _series(what: str, values: list[Any]) -> pl.Series:
    if what == "key":
        return pl.Series(values, dtype=pl.Binary)
    if what == "partition":
        return pl.Series(values, dtype=pl.Int32)
    if what == "offset":
        return pl.Series(values, dtype=pl.Int64)
    if what == "timestamp":
        return pl.Series(values, dtype=pl.Int64).cast(pl.Datetime("ms", "UTC"))
    return pl.Series(values, dtype=pl.List(pl.Struct({"key": pl.String, "value": pl.Binary})))
