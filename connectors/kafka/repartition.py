"""A Kafka topic as the repartition topic of a re-keyed stage (see streamfn.stateful.repartition).

The topic is `<group>.<stage>.repartition`, created with the source's partition count (or
`--set state.repartition_partitions=N`), read by consumer group `<group>.<stage>`. It is
internal: nothing else should write it. Source lanes write it through the run's idempotent
producer (in order, no duplicates from retries); a failed delivery fails the lane. Exactly-once
comes from the confirm marks and sessions of streamfn.stateful.repartition, not from Kafka
transactions, so it holds on brokers without transaction isolation too.
"""
from __future__ import annotations

import logging
import re
import threading
from typing import TYPE_CHECKING, Any

import polars as pl

from streamfn.batch import Batch, Position
from streamfn.connectors.kafka.sink import LaneWriter
from streamfn.connectors.kafka.topic import KafkaTopic
from streamfn.connectors.kafka.topics import kafka
from streamfn.errors import ConfigError, StreamfnError
from streamfn.stateful.repartition import OWNER, confirm_marks

if TYPE_CHECKING:
    from streamfn.context import RunContext

log = logging.getLogger("streamfn.kafka")


class RepartitionTopic(KafkaTopic):
    """One end of a stage's repartition topic: written by the source's lanes, read by the stage's."""

    reads_repartition = True  # streamfn.stateful.keygroup: the keyed stage reads marks too

    def __init__(self, upstream: KafkaTopic, stage: str, keys: list[str]) -> None:
        super().__init__(f"{stage}.repartition", format="arrow", schema=None, key=None, group=None,
                         start="earliest", include=(), brokers=upstream.brokers_arg, create=True, partitions=1,
                         transactional=False, timeout=upstream.timeout_s, consume_batch=upstream.consume_batch,
                         queue_messages=upstream.queue_messages, max_message_bytes=upstream.max_message_bytes,
                         delivery_retries=upstream.delivery_retries, tune_gc=upstream.tune_gc,
                         client_config=upstream.client_config)
        self.upstream, self.stage, self.keys = upstream, stage, keys
        self.lane_writer = RepartitionWriter  # (the KafkaTopic hooks this subclass fills in)
        self.ends_by_marks = self._ended
        self.upstream_ids: list[tuple[str, int]] = []  # the source's (topic, partition)s, in order
        self._ends: dict[str, tuple[int, dict[int, int]]] = {}  # per partition: upstreams, where they ended
        self._targets: list[int] | None = None  # the upstream partitions' ends when first asked
        self._lock = threading.Lock()

    @property
    def partitioned_by(self) -> tuple[str, ...]:
        """Every key is in one partition: the writers route rows by the stage's key."""
        return tuple(self.keys)

    def describe(self) -> str:
        return f"repartition topic of stage {self.stage!r} ({self.topics[0]})"

    def _begin(self, ctx: RunContext) -> None:
        if self._ctx is not None:
            return
        up = self.upstream
        up._begin(ctx)  # its group and partitions name and size this topic
        self.topics = [_topic_name(f"{up.group}.{self.stage}.repartition")]
        self.group_arg = f"{up.group}.{self.stage}"
        self.upstream_ids = sorted((t, p) for t, n in up.partition_counts.items() for p in range(n))
        wanted = ctx.setting("state.repartition_partitions")
        self.partitions_wanted = int(wanted) if wanted else max(1, len(self.upstream_ids))
        if self.partitions_wanted < 1:
            raise ConfigError(f"state.repartition_partitions must be at least 1, got {wanted}")
        super()._begin(ctx)

    def upstream_index(self, partition: str) -> tuple[int, int]:
        """A source lane's partition as a number among the source's partitions, and their count."""
        tp = self.upstream.topic_partition(partition)
        if tp is None or tp not in self.upstream_ids:
            raise ConfigError(f"{self.describe()}: {partition!r} is not a partition of {self.upstream.describe()}")
        return self.upstream_ids.index(tp), len(self.upstream_ids)

    def partition_count(self) -> int:
        """The topic's partitions (the route stage spreads keys over them)."""
        return self.partition_counts[self.topics[0]]

    def note_ends(self, partition: str, upstreams: int, ended: dict[int, int]) -> None:
        """A reading lane's end marks: upstream partition -> the position it ended at."""
        with self._lock:
            self._ends[partition] = (upstreams, ended)

    def _ended(self, partition: str) -> bool:
        """Whether a partition's lane ends: every upstream partition ended past its end at the start."""
        with self._lock:
            upstreams, ended = self._ends.get(partition, (0, {}))
        if not upstreams or len(ended) < upstreams:
            return False
        targets = self._upstream_ends()
        return targets is not None and all(ended.get(u, -1) >= end for u, end in enumerate(targets))

    def _upstream_ends(self) -> list[int] | None:
        """The source partitions' high watermarks, asked once (None: the broker did not answer yet)."""
        if self._targets is None:
            side = self.upstream._source
            if side is None:
                return None
            tps = [kafka().TopicPartition(t, p) for t, p in self.upstream_ids]
            timeout = self.timeout_s

            def ask(consumer: Any) -> list[int]:
                return [consumer.get_watermark_offsets(tp, timeout=timeout, cached=False)[1] for tp in tps]

            try:
                self._targets = side.call(ask, timeout_s=timeout + 5)
            except kafka().KafkaException as exc:
                log.warning("asking for the source's high watermarks failed; asking again",
                            extra={"topic": self.topics[0], "error": str(exc)})
        return self._targets


def _topic_name(name: str) -> str:
    """A legal Kafka topic name (letters, digits, . _ -; at most 249 characters)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)[:249]


class RepartitionWriter(LaneWriter):
    """One source lane's writer: rows to the partition in their OWNER column (set by the route
    stage); after each checkpoint of the lane, a confirm mark to every partition."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._written: pl.DataFrame | None = None  # a row of this lane's session (for its confirms)
        self._confirmed: Position = None

    def write(self, batch: Batch) -> None:
        rows = batch.frame
        if rows.height == 0:
            return
        self.begin(batch)
        self._written = rows.head(1)
        self.produce_arrow_by(rows, OWNER)

    def flush(self, checkpoint_id: str) -> None:
        """Every message delivered, or the lane fails (a lost row would be a wrong window)."""
        if self._producer is None:
            return
        self._wait()
        failed = self._take_failed()
        if failed:
            raise StreamfnError(f"{len(failed)} messages to {self.topic.describe()} were not delivered "
                                f"({failed[0][3]}); the lane stops and its input will be read again")

    def commit(self, checkpoint_id: str, position: Position) -> None:
        """The lane's checkpoint at `position` is saved: readers may apply its rows up to there."""
        if self._written is None or not isinstance(position, int) or position == self._confirmed:
            return
        self.produce_arrow_by(confirm_marks(self._written, self.topic.partition_count(), position), OWNER)
        self._confirmed = position

    @property
    def topic(self) -> RepartitionTopic:
        return self.side.owner  # type: ignore[return-value]
