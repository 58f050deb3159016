"""The Kafka sink: rows produced as messages, delivery checked at every checkpoint.

Without transactions every lane writes through one shared idempotent producer; a failed
delivery is produced again (up to `delivery_retries` times) and then dead-lettered with the
reason. With transactional=True each lane has its own transactional producer and one
transaction per checkpoint. With a Kafka source the transaction commits after the lane's
checkpoint is saved, together with the lane's source offset (`commit`); a restarted lane then
restores the checkpoint at the committed offset (Sink.transactional), so state, output and
offsets agree. With another source it commits at flush (output at least once).
"""
from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

import polars as pl

from streamfn.batch import Batch, Position
from streamfn.connectors.kafka.codec import encode_arrow, encode_rows, key_strings
from streamfn.connectors.kafka.topics import kafka
from streamfn.contracts import Sink
from streamfn.deadletter import DeadLetter
from streamfn.errors import ConfigError, StreamfnError
from streamfn.observe.tracing import inject_headers, tracing_active

if TYPE_CHECKING:
    from streamfn.connectors.kafka.topic import KafkaTopic
    from streamfn.context import RunContext

log = logging.getLogger("streamfn.kafka")

FLUSH_TIMEOUT_S = 60.0
# (value, key, partition or -1, error text)
Failed = tuple[bytes, Any, int, str]


class SinkSide:
    """The sink role of a kafka.topic(): producers and per-lane writers."""

    def __init__(self, owner: "KafkaTopic", ctx: "RunContext") -> None:
        if len(owner.topics) != 1:
            raise ConfigError(f"a Kafka sink writes one topic; {owner.describe()} names {len(owner.topics)}")
        self.owner = owner
        self.ctx = ctx
        self.topic = owner.topics[0]
        self._lock = threading.Lock()
        self._producer: Any = None
        self._shared: LaneWriter | None = None
        self._shared_lock = threading.Lock()

    def new_producer(self, conf: dict[str, Any]) -> Any:
        """A confluent-kafka Producer; a bad setting is a ConfigError."""
        try:
            return kafka().Producer(conf)
        except kafka().KafkaException as exc:
            raise ConfigError(f"bad Kafka producer setting for {self.owner.describe()}: {exc.args[0]}") from exc

    def shared_producer(self) -> Any:
        with self._lock:
            if self._producer is None:
                self._producer = self.new_producer({**self.owner.producer_conf, "delivery.report.only.error": True})
            return self._producer

    def for_lane(self, lane: str) -> "LaneWriter":
        """A writer for one lane (its own transactional producer when transactional=True)."""
        writer = self.owner.lane_writer or LaneWriter
        if not self.owner.transactional:
            return writer(self, lane, self.shared_producer(), transactional=False)
        prefix = self.owner.producer_conf.get("transactional.id") or f"streamfn-{self.ctx.pipeline}-{self.topic}"
        conf = {**self.owner.producer_conf, "transactional.id": f"{prefix}-{lane}",
                "delivery.report.only.error": True}
        producer = self.new_producer(conf)
        producer.init_transactions(self.owner.timeout_s)
        return writer(self, lane, producer, transactional=True)

    def shared_writer(self) -> "LaneWriter":
        with self._lock:
            if self._shared is None:
                self._shared = LaneWriter(self, "shared", None, transactional=False)
            return self._shared

    def close(self) -> None:
        """Deliver what is still queued, then drop the shared producer."""
        if self._shared is not None:
            self._shared.close()
        if self._producer is not None:
            left = self._producer.flush(FLUSH_TIMEOUT_S)
            if left:
                log.error("kafka sink closed with undelivered messages", extra={"topic": self.topic, "count": left})
            self._producer = None


class LaneWriter(Sink):
    """Writes one lane's batches; checks their delivery at flush."""

    def __init__(self, side: SinkSide, lane: str, producer: Any, *, transactional: bool) -> None:
        self.side = side
        self.lane = lane
        self._producer = producer
        self.transactional = transactional
        self._lock = threading.Lock()
        self._failed: list[Failed] = []
        self._in_txn = False
        self._lineage: tuple[str, str] = ("", lane)
        self._keyed_arrow = False  # Arrow rows routed to partitions by key: a retry keeps the partition

    @property
    def producer(self) -> Any:
        if self._producer is None:
            self._producer = self.side.shared_producer()
        return self._producer

    def describe(self) -> str:
        return self.side.owner.describe()

    def _on_delivery(self, err: Any, msg: Any) -> None:
        if err is not None:  # called on the thread that polls the producer
            with self._lock:
                self._failed.append((msg.value(), msg.key(), msg.partition() if self._keyed_arrow else -1, err.str()))

    def write(self, batch: Batch) -> None:
        frame = batch.frame
        if frame.height == 0:
            return
        self.begin(batch)
        owner = self.side.owner
        if owner.format == "arrow":
            self._write_arrow(frame)
            return
        values = encode_rows(owner.format, frame)
        keys = key_strings(frame, owner.key)
        self.produce_all(values, keys if keys is not None else [None] * len(values), None)

    def begin(self, batch: Batch | None) -> None:
        """Before producing a batch's messages: note its lineage, open the transaction."""
        if batch is not None:
            self._lineage = (batch.source, batch.partition)
        if self.transactional and not self._in_txn:
            self.producer.begin_transaction()
            self._in_txn = True

    def _write_arrow(self, frame: pl.DataFrame) -> None:
        owner = self.side.owner
        if owner.key is None:
            self.produce_all(encode_arrow(frame, owner.max_message_bytes), None, None)
            return
        # one message holds many rows: route rows by a hash of the key, so a key stays in one partition
        count = owner.partition_counts.get(self.side.topic, 1)
        if owner.key not in frame.columns:
            raise ConfigError(f"the Kafka sink's key column {owner.key!r} is not among the rows' columns {frame.columns}")
        parts = frame.with_columns(pl.col(owner.key).cast(pl.String).hash(seed=0).mod(count).alias("__p"))
        self._keyed_arrow = True
        self.produce_arrow_by(parts, "__p")

    def produce_arrow_by(self, rows: pl.DataFrame, column: str) -> None:
        """Produce rows as Arrow messages, each group to the partition its `column` names."""
        for (partition,), part in rows.group_by(column, maintain_order=True):
            self.produce_all(encode_arrow(part.drop(column), self.side.owner.max_message_bytes),
                             None, int(partition))  # type: ignore[call-overload]

    def produce_all(self, values: list[bytes], keys: list[Any] | None, partition: int | None) -> None:
        """Produce messages (to one partition, or by key when partition is None); failures are kept."""
        produce, poll, topic, callback = self.producer.produce, self.producer.poll, self.side.topic, self._on_delivery
        part = -1 if partition is None else partition
        keys = keys if keys is not None else [None] * len(values)
        # the sink's span is current here: its traceparent goes with every message of the batch
        traced = {"headers": inject_headers()} if tracing_active() else {}
        for value, key in zip(values, keys):
            while True:
                try:
                    produce(topic, value, key, partition=part, on_delivery=callback, **traced)
                    break
                except BufferError:  # the local queue is full: let deliveries drain
                    poll(0.05)
                except kafka().KafkaException as exc:  # e.g. the message is larger than allowed
                    self._refused(value, key, exc.args[0].str())
                    break
        poll(0)

    def _refused(self, value: bytes, key: Any, reason: str) -> None:
        source, partition = self._lineage
        letter = DeadLetter(f"sink {self.side.topic}", source, partition, None, f"Kafka refused the message: {reason}",
                            value if isinstance(value, bytes) else bytes(value))
        self.side.ctx.dead_letters([letter])

    def flush(self, checkpoint_id: str) -> None:
        """Wait for every delivery; retry failures, then dead-letter them; commit the transaction."""
        if self._producer is None:
            return
        self._wait()
        failed = self._take_failed()
        if self.transactional:  # with a Kafka source, the lane commits it with the offset (commit)
            self._check_transaction(failed)
            if self._in_txn and self._kafka_source() is None:
                self._commit_transaction(None)
            return
        for _ in range(self.side.owner.delivery_retries):
            if not failed:
                break
            log.warning("kafka deliveries failed; producing them again",
                        extra={"topic": self.side.topic, "count": len(failed), "error": failed[0][3]})
            for value, key, partition, _ in failed:
                self.produce_all([value], [key], None if partition < 0 else partition)
            self._wait()
            failed = self._take_failed()
        if failed:
            source, lane_partition = self._lineage
            self.side.ctx.dead_letters([
                DeadLetter(f"sink {self.side.topic}", source, lane_partition, None,
                           f"Kafka delivery failed: {error}", value or b"") for value, _, _, error in failed])

    def _wait(self) -> None:
        left = self.producer.flush(FLUSH_TIMEOUT_S)
        if left:
            raise StreamfnError(f"{left} messages to Kafka topic {self.side.topic!r} were not delivered within "
                                f"{FLUSH_TIMEOUT_S:g}s; is the broker {self.side.owner.brokers} up?")

    def _take_failed(self) -> list[Failed]:
        with self._lock:
            failed, self._failed = self._failed, []
        return failed

    def _check_transaction(self, failed: list[Failed]) -> None:
        if failed and self._in_txn:
            self.producer.abort_transaction(self.side.owner.timeout_s)
            self._in_txn = False
            raise StreamfnError(f"{len(failed)} messages to Kafka topic {self.side.topic!r} failed in a transaction "
                                f"({failed[0][3]}); it was aborted and its input will be read again")

    def commit(self, checkpoint_id: str, position: Position) -> None:
        """The lane's checkpoint is saved: commit the transaction with the source's offset."""
        if self.transactional and self._in_txn:
            self._commit_transaction(position)

    def _kafka_source(self) -> KafkaTopic | None:
        """The Kafka source of this writer's lane (None: another kind of source)."""
        from streamfn.connectors.kafka.topic import KafkaTopic

        source = self.side.ctx.source(self._lineage[0])
        return source if isinstance(source, KafkaTopic) else None

    def _commit_transaction(self, position: Position) -> None:
        source = self._kafka_source()
        tp = source.topic_partition(self._lineage[1]) if source is not None else None
        if tp is not None and isinstance(position, int):  # the next offset to read, as the lane's commit
            self.producer.send_offsets_to_transaction([kafka().TopicPartition(tp[0], tp[1], position)],
                                                      source.group_metadata(), self.side.owner.timeout_s)  # type: ignore[union-attr]
        self.producer.commit_transaction(self.side.owner.timeout_s)
        self._in_txn = False

    def close(self) -> None:
        if self.transactional and self._producer is not None:
            if self._in_txn:  # the lane failed or is closing without a commit: nothing of it may show
                try:
                    self.producer.abort_transaction(self.side.owner.timeout_s)
                except kafka().KafkaException as exc:
                    log.warning("aborting a Kafka transaction failed", extra={"error": str(exc)})
            self.producer.flush(FLUSH_TIMEOUT_S)
            self._producer = None
