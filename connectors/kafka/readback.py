"""Until-idle read-back: a Kafka source reading a topic that a Kafka sink of the same run writes.

Reading such a topic "to its end" means nothing while the run still writes it: the end moves.
So in an until-idle run, a partition of a topic that a sink of the same pipeline writes (same
brokers, same topic name) ends only when all of these hold:

1. every source whose lanes feed those sinks has ended: its lanes committed, which flushed the
   producers and checked their deliveries (`RunContext.sources_done`), and it opens no more;
2. the partition was read up to the high watermark asked for after that (ListOffsets);
3. the consumer reported the partition's end (a partition-EOF event) at the position reached.

(3) makes it exact on brokers whose ListOffsets answer is too low (Tansu answers the last
batch's base offset + 1): the EOF event comes from a fetch response, whose high watermark is
right, and a fetch past the last batch's base offset was made after that batch was written.

The source's own lanes are never waited for (a pipeline that writes the topic it reads would
wait for itself); partitions of topics no sink of the run writes end as before. Outside
until-idle runs, `kafka.topic(..., stop_with_writers=True)` asks for the same ending (every
topic of that source must then be written by the run).
"""
from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from streamfn.connectors.kafka.topics import kafka
from streamfn.errors import ConfigError

if TYPE_CHECKING:
    from streamfn.connectors.kafka.chunks import PartitionQueue
    from streamfn.connectors.kafka.source import SourceSide
    from streamfn.connectors.kafka.topic import KafkaTopic
    from streamfn.context import RunContext
    from streamfn.contracts import Source

log = logging.getLogger("streamfn.kafka")

_CHECK_EVERY_S = 0.05  # how often idle lanes ask whether the feeding sources ended


class ReadBack:
    """Which topics of a Kafka source the same run writes, and when their partitions end."""

    def __init__(self, owner: KafkaTopic, ctx: RunContext, topics: set[str], feeders: list[Source]) -> None:
        self.owner, self.ctx, self.topics, self.feeders = owner, ctx, topics, feeders
        self._lock = threading.Lock()
        self._settled = False
        self._checked_at = 0.0
        self._targets: dict[str, int] = {}

    @classmethod
    def for_source(cls, owner: KafkaTopic, ctx: RunContext) -> ReadBack | None:
        """The read-back of a starting source, or None when no Kafka sink of the run writes its topics."""
        from streamfn.connectors.kafka.topic import KafkaTopic

        if (not ctx.until_idle and not owner.stop_with_writers) or owner.ends_by_marks is not None:
            return None  # (a repartition topic ends by its writers' end marks)
        topics: set[str] = set()
        feeders: list[Source] = []
        for sink in ctx.sinks():
            if not isinstance(sink, KafkaTopic) or sink is owner or sink.brokers != owner.brokers:
                continue
            shared = set(sink.topics) & set(owner.topics)
            if shared:
                topics |= shared
                feeders += [s for s in ctx.feeders(sink) if s is not owner and s not in feeders]
        unwritten = [t for t in owner.topics if t not in topics]
        if owner.stop_with_writers and unwritten:
            raise ConfigError(f"{owner.describe()}: stop_with_writers=True needs a Kafka sink of this pipeline "
                              f"writing each topic it reads; none writes {', '.join(unwritten)}")
        if not topics:
            return None
        log.info("kafka source reads topics this run writes; they end after their writers", extra={
            "source": owner.describe(), "topics": ",".join(sorted(topics)),
            "writers": ",".join(f.describe() for f in feeders) or "none"})
        return cls(owner, ctx, topics, feeders)

    def covers(self, topic: str) -> bool:
        """Whether partitions of this topic end by the read-back rule."""
        return topic in self.topics

    def settled(self) -> bool:
        """True once every source feeding the sinks of these topics has ended (then for good)."""
        if self._settled:
            return True
        with self._lock:
            now = time.monotonic()
            if not self._settled and now - self._checked_at >= _CHECK_EVERY_S:
                self._checked_at = now
                if self.ctx.sources_done(self.feeders):
                    self._settled = True
                    log.info("the writers of the read-back topics ended", extra={
                        "source": self.owner.describe(), "topics": ",".join(sorted(self.topics))})
        return self._settled

    def at_end(self, side: SourceSide, queue: PartitionQueue, position: int | None, eof: bool) -> bool:
        """Whether a read-back partition has nothing more to come (asked by its idle lane)."""
        if not eof or position is None or not self.settled():
            return False
        target = self._targets.get(queue.name)
        if target is None:
            found = self._high_watermark(side, queue)
            if found is None:
                return False
            target = self._targets[queue.name] = found
        return position >= target

    def _high_watermark(self, side: SourceSide, queue: PartitionQueue) -> int | None:
        """The partition's high watermark now, from the broker (not from an earlier fetch)."""
        tp = kafka().TopicPartition(queue.topic, queue.partition)
        timeout = self.owner.timeout_s

        def ask(consumer: Any) -> tuple[int, int]:
            return consumer.get_watermark_offsets(tp, timeout=timeout, cached=False)  # type: ignore[no-any-return]

        try:
            _, high = side.call(ask, timeout_s=timeout + 5)
        except kafka().KafkaException as exc:
            log.warning("asking for a high watermark failed; asking again", extra={
                "partition": queue.name, "error": str(exc)})
            return None
        return int(high) if high is not None and high >= 0 else None
