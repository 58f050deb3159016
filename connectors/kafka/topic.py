"""kafka.topic(): one object that is a source when given to p.source and a sink when given to .sink."""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from streamfn.batch import Batch, Position
from streamfn.connectors.kafka import broker as _broker
from streamfn.connectors.kafka.codec import FORMATS
from streamfn.connectors.kafka.config import brokers_from, client_config
from streamfn.connectors.kafka.topics import ensure_topics
from streamfn.contracts import Sink, Source, SourcePartition
from streamfn.errors import ConfigError, StreamfnError
from streamfn.schema import normalise_schema
from streamfn.timeparse import parse_duration_s

if TYPE_CHECKING:
    from streamfn.connectors.kafka.readback import ReadBack
    from streamfn.connectors.kafka.sink import LaneWriter, SinkSide
    from streamfn.connectors.kafka.source import SourceSide
    from streamfn.context import RunContext

log = logging.getLogger("streamfn.kafka")

_STARTS = ("committed", "earliest", "latest")


class KafkaTopic(Source, Sink):
    """One or more Kafka topics; the role (source or sink) is the node it is given to."""

    def __init__(self, topics: str | Sequence[str], *, format: str, schema: Any, key: str | None,
                 group: str | None, start: str, include: Sequence[str], brokers: str | None, create: bool,
                 partitions: int, transactional: bool, timeout: str | float, consume_batch: int,
                 queue_messages: int, max_message_bytes: int, delivery_retries: int, tune_gc: bool,
                 client_config: Mapping[str, Any], stop_with_writers: bool = False) -> None:
        from streamfn.connectors.kafka.chunks import INCLUDE

        self.topics = [topics] if isinstance(topics, str) else list(topics)
        if not self.topics or not all(isinstance(t, str) and t for t in self.topics):
            raise ConfigError(f"kafka.topic() needs a topic name or a list of names, got {topics!r}")
        if format not in FORMATS:
            raise ConfigError(f"kafka.topic(format=...) must be one of {', '.join(FORMATS)}, got {format!r}")
        if start not in _STARTS:
            raise ConfigError(f"kafka.topic(start=...) must be one of {', '.join(_STARTS)}, got {start!r}")
        unknown = [i for i in include if i not in INCLUDE]
        if unknown:
            raise ConfigError(f"kafka.topic(include=...) takes {', '.join(INCLUDE)}; unknown: {', '.join(unknown)}")
        if partitions < 1:
            raise ConfigError(f"kafka.topic(partitions=...) must be at least 1, got {partitions}")
        self.format = format
        self.schema = normalise_schema(schema)
        self.key = key
        self.group_arg = group
        self.start_at = start
        self.include = tuple(include)
        self.brokers_arg = brokers
        self.create = create
        self.partitions_wanted = partitions
        self.transactional = transactional
        self.timeout_s = parse_duration_s(timeout)
        self.consume_batch = consume_batch
        self.queue_messages = queue_messages
        self.max_message_bytes = max_message_bytes
        self.delivery_retries = delivery_retries
        self.tune_gc = tune_gc
        self.stop_with_writers = stop_with_writers
        self.client_config = dict(client_config)
        self.assign_timeout_s = 60.0
        # resolved in start()
        self.brokers = ""
        self.group = ""
        self.embedded = False
        self.consumer_conf: dict[str, Any] = {}
        self.producer_conf: dict[str, Any] = {}
        self.partition_counts: dict[str, int] = {}
        self._ctx: RunContext | None = None
        self._source: SourceSide | None = None
        self._sink: SinkSide | None = None
        self._holds_broker = False
        self.readback: ReadBack | None = None  # until-idle: topics this run also writes
        # set by a repartition topic (connectors/kafka/repartition.py): its lane writer, and when a
        # partition of it ends
        self.lane_writer: type[LaneWriter] | None = None
        self.ends_by_marks: Callable[[str], bool] | None = None

    def start(self, ctx: "RunContext") -> None:
        """Resolve brokers and settings, start the embedded broker if needed, check the topics."""
        self._begin(ctx)

    def default_name(self) -> str:
        return self.topics[0].replace("/", "_")

    # read by streamfn.stateful: a keyed stage is re-keyed unless its key is how the source is partitioned
    group_assigned = True  # a consumer group spreads the partitions over processes

    @property
    def partitioned_by(self) -> tuple[str, ...] | None:
        """The column the topic is keyed by (key=): each of its values is in one partition."""
        return (self.key,) if self.key else None

    def repartition(self, stage: str, keys: list[str]) -> tuple[Sink, Source]:
        """The writing and reading ends of a repartition topic for a stage keyed by `keys`."""
        from streamfn.connectors.kafka.repartition import RepartitionTopic

        return RepartitionTopic(self, stage, keys), RepartitionTopic(self, stage, keys)

    def describe(self) -> str:
        return f"kafka.topic({','.join(self.topics)}, format={self.format})"

    def partition_name(self, topic: str, partition: int) -> str:
        """A lane's partition name: the number, or topic:number when the source reads several topics."""
        return str(partition) if len(self.topics) == 1 else f"{topic}:{partition}"

    # -- shared start -------------------------------------------------------------------------
    def _begin(self, ctx: "RunContext") -> None:
        """Resolve brokers and settings, start the embedded broker if needed, check the topics."""
        if self._ctx is not None:
            return
        self._ctx = ctx
        settings = dict(ctx.settings)
        brokers = brokers_from(self.brokers_arg, settings)
        if brokers is None:
            brokers = _broker.shared.acquire()
            self._holds_broker = True
            self.embedded = True
        self.brokers = brokers
        self.group = self.group_arg or settings.get("kafka.group") or f"streamfn-{ctx.pipeline}"
        self.consumer_conf = client_config("consumer", brokers=brokers, embedded=self.embedded,
                                           settings=settings, given=self.client_config)
        self.consumer_conf["group.id"] = self.group
        self.producer_conf = client_config("producer", brokers=brokers, embedded=self.embedded,
                                           settings=settings, given=self.client_config)
        self.partition_counts = ensure_topics(brokers, self.topics, create=self.create or self.embedded,
                                              partitions=self.partitions_wanted, timeout_s=self.timeout_s,
                                              extra=self.consumer_conf)

    def _end(self) -> None:
        if self._holds_broker:
            self._holds_broker = False
            _broker.shared.release()

    # -- source -------------------------------------------------------------------------------
    def ending(self) -> bool:
        """Whether this source's partitions end: an until-idle run, or read-back with stop_with_writers."""
        return self._ctx is not None and (self._ctx.until_idle or self.readback is not None)

    def partitions(self) -> list[str]:
        """Partitions come from the group's assignment, during the run: none up front."""
        from streamfn.connectors.kafka.readback import ReadBack
        from streamfn.connectors.kafka.source import SourceSide

        if self._ctx is None:
            raise StreamfnError(f"{self.describe()} was not started")
        if self._source is None:
            self.readback = ReadBack.for_source(self, self._ctx)
            self._source = SourceSide(self)
            self._source.start(self._ctx)
        return []

    def topic_partition(self, partition: str) -> tuple[str, int] | None:
        """The (topic, partition number) of a lane's partition name."""
        if len(self.topics) == 1:
            return (self.topics[0], int(partition)) if partition.isdigit() else None
        topic, _, number = partition.rpartition(":")
        return (topic, int(number)) if number.isdigit() else None

    def group_metadata(self) -> Any:
        """The consumer's group metadata (for send_offsets_to_transaction)."""
        assert self._source is not None and self._source.consumer is not None
        return self._source.call(lambda consumer: consumer.consumer_group_metadata())

    offsets_in_transactions = True  # a transactional Kafka sink commits this source's offsets

    def committed_position(self, partition: str) -> Position:
        """The group's committed offset of a partition when it was assigned (None: none)."""
        return self._source.group_committed.get(partition) if self._source is not None else None

    def open(self, partition: str, resume: Position) -> SourcePartition:
        assert self._source is not None
        return self._source.open(partition, resume)

    def exhausted(self) -> bool:
        return self._source.exhausted() if self._source is not None else True

    def stop(self) -> None:
        if self._source is not None:
            self._source.stop()
        self._end()

    # -- sink ---------------------------------------------------------------------------------
    def _sink_side(self) -> "SinkSide":
        from streamfn.connectors.kafka.sink import SinkSide

        if self._sink is None:
            if self._ctx is None:
                raise StreamfnError(f"{self.describe()} was not started")
            self._sink = SinkSide(self, self._ctx)
        return self._sink

    def for_lane(self, lane: str) -> Sink:
        if self._ctx is None:  # the runtime takes its dead-letter writer before start()
            return _LateWriter(self, lane)
        return self._sink_side().for_lane(lane)

    def write(self, batch: Batch) -> None:
        self._sink_side().shared_writer().write(batch)

    def flush(self, checkpoint_id: str) -> None:
        if self._sink is not None:
            self._sink.shared_writer().flush(checkpoint_id)

    def close(self) -> None:
        if self._sink is not None:
            self._sink.close()
        self._end()


class _LateWriter(Sink):
    """A lane writer asked for before the topic was started: made at its first use."""

    def __init__(self, topic: KafkaTopic, lane: str) -> None:
        self._topic, self._lane = topic, lane
        self._writer: Sink | None = None

    def _get(self) -> Sink:
        if self._writer is None:
            self._writer = self._topic._sink_side().for_lane(self._lane)
        return self._writer

    def write(self, batch: Batch) -> None:
        self._get().write(batch)

    def flush(self, checkpoint_id: str) -> None:
        if self._writer is not None:
            self._writer.flush(checkpoint_id)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
