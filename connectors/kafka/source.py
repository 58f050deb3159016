"""The Kafka source: one group consumer per source, a poller thread, one lane per partition.

The poller thread owns the consumer: it calls `consume()`, hands each partition's messages
to that partition's bounded queue (pausing the partition while its queue is full) and runs
the group callbacks, which open lanes on assign and close them (flushed and committed) on
revoke. The lanes parse whole blocks of values at once.
"""
from __future__ import annotations

import gc
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any


from streamfn.batch import Position
from streamfn.connectors.kafka.chunks import Chunk, PartitionQueue, make_chunk
from streamfn.connectors.kafka.codec import Decoder
from streamfn.connectors.kafka.reader import KafkaPartition
from streamfn.connectors.kafka.topics import kafka
from streamfn.contracts import SourcePartition
from streamfn.errors import ConfigError, StreamfnError

if TYPE_CHECKING:
    from streamfn.connectors.kafka.topic import KafkaTopic
    from streamfn.context import RunContext

log = logging.getLogger("streamfn.kafka")



_GC_GEN0 = 50_000
_gc_tuned = False


def tune_gc() -> None:
    """Make Python's cyclic GC cheap next to consume(), once per process.

    Every message consume() returns is a GC-tracked object; with the default threshold (700)
    a 10,000-message call triggers many collections, and the older generations walk every
    object the process holds (polars, pyarrow...): half the pipeline's CPU in a profile. A
    first threshold of 50,000 makes the same run about 1.8x cheaper. Only the thresholds
    change (no gc.freeze(), which hides objects from gc.get_referrers users such as
    Hypothesis). Turn it off with kafka.topic(..., tune_gc=False)."""
    global _gc_tuned
    if _gc_tuned:
        return
    _gc_tuned = True
    gen0, gen1, gen2 = gc.get_threshold()
    if 0 < gen0 < _GC_GEN0:
        gc.set_threshold(_GC_GEN0, max(gen1, 20), max(gen2, 100))
    log.debug("garbage collector tuned for bulk consumption", extra={"threshold": gc.get_threshold()})


class SourceSide:
    """The source role of a kafka.topic(): consumer, poller thread and partition queues."""

    def __init__(self, owner: "KafkaTopic") -> None:
        self.owner = owner
        self.decoder = Decoder(owner.format, owner.schema)
        self.ctx: RunContext | None = None
        self.consumer: Any = None
        self.queues: dict[str, PartitionQueue] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._assigned_once = False
        self._rebalancing = False  # between a revoke and the assignment that follows it
        self._closing = False
        self._started_at = 0.0
        self._requests: deque[_Request] = deque()
        self.group_committed: dict[str, int] = {}  # the group's committed offsets, per partition name
        self.cooperative = "cooperative" in str(owner.consumer_conf.get("partition.assignment.strategy", ""))

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self, ctx: "RunContext") -> None:
        """Create the consumer, subscribe and start the poller thread."""
        self.ctx = ctx
        if self.owner.tune_gc:
            tune_gc()
        conf = dict(self.owner.consumer_conf)
        if self.owner.ending():
            conf["enable.partition.eof"] = True
        conf["error_cb"] = self._on_client_error
        try:
            self.consumer = kafka().Consumer(conf)
        except kafka().KafkaException as exc:
            raise ConfigError(f"bad Kafka consumer setting for {self.owner.describe()}: {exc.args[0]}") from exc
        self.consumer.subscribe(list(self.owner.topics), on_assign=self._on_assign, on_revoke=self._on_revoke,
                                on_lost=self._on_lost)
        self._started_at = time.monotonic()
        self._thread = threading.Thread(target=self._poll_loop, name=f"kafka-poller-{self.owner.default_name()}",
                                        daemon=True)
        self._thread.start()
        log.info("kafka source subscribed", extra={"topics": ",".join(self.owner.topics),
                                                   "group": self.owner.group, "brokers": self.owner.brokers})

    def stop(self) -> None:
        """Stop the poller and leave the group."""
        self._closing = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.consumer is not None:
            try:
                self.consumer.close()
            except (RuntimeError, kafka().KafkaException) as exc:
                log.warning("closing the Kafka consumer failed", extra={"error": str(exc)})
            self.consumer = None

    def _fail(self, exc: BaseException) -> None:
        log.error("kafka source failed", exc_info=exc, extra={"source": self.owner.describe()})
        if self._error is None:
            self._error = exc

    def check(self) -> None:
        """Raise the poller thread's error in the caller (a lane, or the runtime)."""
        if self._error is not None:
            raise self._error

    def _on_client_error(self, err: Any) -> None:
        if err.fatal():
            self._fail(StreamfnError(f"Kafka consumer error: {err.str()}"))
        else:
            log.warning("kafka client error", extra={"error": err.str(), "code": err.name()})

    # -- the poller thread --------------------------------------------------------------------
    def call(self, fn: Callable[[Any], Any], timeout_s: float = 60.0) -> Any:
        """Run fn(consumer) on the poller thread and return its result.

        confluent-kafka serialises calls on one consumer, and a thread looping in consume()
        starves every other caller: so only the poller thread touches the consumer."""
        if threading.current_thread() is self._thread or self._thread is None or not self._thread.is_alive():
            return fn(self.consumer)
        request = _Request(fn)
        self._requests.append(request)
        if not request.done.wait(timeout_s):
            raise StreamfnError(f"the Kafka consumer of {self.owner.describe()} did not answer within {timeout_s:g}s")
        if request.error is not None:
            raise request.error
        return request.result

    def _serve_requests(self) -> None:
        while self._requests:
            self._requests.popleft().run(self.consumer)

    def _poll_loop(self) -> None:
        consume = self.consumer.consume
        batch = self.owner.consume_batch
        partition_of = kafka().Message.partition
        while not self._stop.is_set():
            try:
                paused = any(q.paused for q in self.queues.values())
                messages = consume(num_messages=batch, timeout=0.02 if paused else 0.1)
                if messages:
                    for partition, run in itertools.groupby(messages, partition_of):
                        self._route(partition, list(run))
                self._pause_resume()
                self._serve_requests()
            except BaseException as exc:  # the run must hear of it: lanes and exhausted() re-raise
                self._fail(exc)
                while self._requests:
                    self._requests.popleft().cancel(exc)
                return
        self._serve_requests()

    def _route(self, partition: int, messages: list[Any]) -> None:
        topic = messages[0].topic()
        queue = self.queues.get(self.owner.partition_name(topic, partition)) if topic else None
        if queue is None:
            for message in messages:
                error = message.error()
                if error is not None and error.code() != kafka().KafkaError._PARTITION_EOF:
                    self._on_message_error(error)
            return
        if any(map(kafka().Message.error, messages)):
            self._route_events(queue, messages)
        else:
            queue.put(make_chunk(messages, self.owner.include))
        if queue.target is None and self.ctx is not None and self.ctx.until_idle:
            self._set_target(queue)
        if self.ctx is not None:
            self.ctx.wake(self.owner, queue.name)

    def _route_events(self, queue: PartitionQueue, messages: list[Any]) -> None:
        """Messages mixed with events: data runs become chunks, end-of-partition events end marks."""
        eof_code = kafka().KafkaError._PARTITION_EOF
        run: list[Any] = []
        for message in messages:
            error = message.error()
            if error is None:
                run.append(message)
                continue
            if run:
                queue.put(make_chunk(run, self.owner.include))
                run = []
            if error.code() == eof_code:
                queue.put(Chunk([], message.offset(), eof=True))
            else:
                self._on_message_error(error)
        if run:
            queue.put(make_chunk(run, self.owner.include))

    def _set_target(self, queue: PartitionQueue) -> None:
        """Until-idle reads up to the high watermark seen in the first fetch (right on every broker,
        unlike a ListOffsets query); only the poller thread may call the consumer for it."""
        tp = kafka().TopicPartition(queue.topic, queue.partition)
        try:
            _, high = self.consumer.get_watermark_offsets(tp, cached=True)
        except kafka().KafkaException:
            return
        if high is not None and high >= 0:
            queue.target = high

    def _on_message_error(self, error: Any) -> None:
        if error.fatal() or error.code() in (kafka().KafkaError.UNKNOWN_TOPIC_OR_PART,
                                              kafka().KafkaError.TOPIC_AUTHORIZATION_FAILED):
            raise StreamfnError(f"Kafka consumer of {self.owner.describe()}: {error.str()}")
        log.warning("kafka consumer error", extra={"error": error.str(), "code": error.name()})

    def _pause_resume(self) -> None:
        limit = self.owner.queue_messages
        pause, resume = [], []
        for queue in list(self.queues.values()):
            if not queue.paused and (queue.queued >= limit or queue.ended):
                queue.paused = True
                pause.append(kafka().TopicPartition(queue.topic, queue.partition))
            elif queue.paused and queue.queued <= limit // 2 and not queue.ended:
                queue.paused = False
                resume.append(kafka().TopicPartition(queue.topic, queue.partition))
        if pause:
            self.consumer.pause(pause)
        if resume:
            self.consumer.resume(resume)

    # -- group callbacks (run on the poller thread, inside consume()) -----------------------
    def _on_assign(self, consumer: Any, partitions: list[Any]) -> None:
        try:
            self._assign(consumer, partitions)
        except BaseException as exc:
            self._fail(exc)

    def _assign(self, consumer: Any, partitions: list[Any]) -> None:
        if self._closing or self.ctx is None or self.ctx.stopping:
            return
        names = {}
        for tp in partitions:
            name = self.owner.partition_name(tp.topic, tp.partition)
            names[name] = tp
            self.queues[name] = PartitionQueue(tp.topic, tp.partition, name)
        self._committed = self._start_offsets(consumer, partitions)
        self._opened: dict[str, int | None] = {}
        self.ctx.add_partitions(self.owner, dict.fromkeys(names))  # the runtime asks its checkpoint first
        for name, tp in names.items():
            start = self._opened.get(name)
            tp.offset = start if start is not None else self._logical_start()
        if self.cooperative:
            consumer.incremental_assign(partitions)
        else:
            consumer.assign(partitions)
        if partitions:  # librdkafka keeps a pause across unassign/assign; the new queues are not paused
            consumer.resume(partitions)
        self._assigned_once = True
        self._rebalancing = False
        log.info("kafka partitions assigned", extra={"source": self.owner.describe(), "group": self.owner.group,
                                                     "partitions": ",".join(names) or "none"})

    def _start_offsets(self, consumer: Any, partitions: list[Any]) -> dict[str, int]:
        """Where each partition starts without a checkpoint: the committed offset, else (when
        reading from the earliest) the low watermark, so the first batch's offsets are known."""
        found: dict[str, int] = {}
        if partitions:
            for tp in consumer.committed(partitions, timeout=self.owner.timeout_s):
                if tp.error is None and tp.offset >= 0:
                    found[self.owner.partition_name(tp.topic, tp.partition)] = tp.offset
        self.group_committed.update(found)  # (a transactional sink's lanes restore at these)
        if self.owner.start_at != "committed":
            found = {}
        earliest = self.owner.start_at == "earliest" or (
            self.owner.start_at == "committed" and self.owner.consumer_conf.get("auto.offset.reset") in
            ("earliest", "smallest", "beginning"))
        for tp in partitions if earliest else ():
            name = self.owner.partition_name(tp.topic, tp.partition)
            if name not in found:
                low, _ = consumer.get_watermark_offsets(kafka().TopicPartition(tp.topic, tp.partition),
                                                        timeout=self.owner.timeout_s)
                found[name] = low  # low watermarks are right on every broker tested (high ones are not)
        return found

    def _logical_start(self) -> int:
        k = kafka()
        return k.OFFSET_END if self.owner.start_at == "latest" else (
            k.OFFSET_BEGINNING if self.owner.start_at == "earliest" else k.OFFSET_STORED)

    def _on_revoke(self, consumer: Any, partitions: list[Any]) -> None:
        try:
            self._revoke(consumer, partitions, lost=False)
        except BaseException as exc:
            self._fail(exc)

    def _on_lost(self, consumer: Any, partitions: list[Any]) -> None:
        try:
            self._revoke(consumer, partitions, lost=True)
        except BaseException as exc:
            self._fail(exc)

    def _revoke(self, consumer: Any, partitions: list[Any], *, lost: bool) -> None:
        names = [self.owner.partition_name(tp.topic, tp.partition) for tp in partitions]
        self._rebalancing = not self.cooperative
        if not self._closing and self.ctx is not None and not self.ctx.stopping:
            for name in names:
                if lost and name in self.queues:
                    self.queues[name].lost = True
            self._remove_serving(names)
        for name in names:
            self.queues.pop(name, None)
        if self.cooperative:
            consumer.incremental_unassign(partitions)
        log.info("kafka partitions revoked", extra={"source": self.owner.describe(), "lost": lost,
                                                    "partitions": ",".join(names) or "none"})

    def _remove_serving(self, names: list[str]) -> None:
        """Close the lanes of revoked partitions (they commit through this thread meanwhile)."""
        assert self.ctx is not None
        errors: list[BaseException] = []

        def remove() -> None:
            try:
                self.ctx.remove_partitions(self.owner, names)  # type: ignore[union-attr]
            except BaseException as exc:
                errors.append(exc)

        helper = threading.Thread(target=remove, name="kafka-revoke", daemon=True)
        helper.start()
        while helper.is_alive():
            self._serve_requests()
            helper.join(0.005)
        self._serve_requests()
        if errors:
            raise errors[0]

    # -- what the runtime asks -------------------------------------------------------------
    def open(self, partition: str, resume: Position) -> SourcePartition:
        """A lane's reader: its resume position is the checkpoint's, else the committed offset."""
        queue = self.queues.get(partition)
        if queue is None:
            raise StreamfnError(f"partition {partition} of {self.owner.describe()} is not assigned to this worker")
        start = int(resume) if resume is not None else self._committed.get(partition)
        self._opened[partition] = start
        return KafkaPartition(self, queue, start)

    def exhausted(self) -> bool:
        """Until-idle: True once every assigned partition was read to its end."""
        self.check()
        if self.ctx is None or not self.owner.ending():
            return False
        if not self._assigned_once or self._rebalancing:
            if not self._assigned_once and time.monotonic() - self._started_at > self.owner.assign_timeout_s:
                raise StreamfnError(f"no partitions of {self.owner.describe()} were assigned to group "
                                    f"{self.owner.group!r} within {self.owner.assign_timeout_s:g}s")
            return False
        return all(q.ended for q in list(self.queues.values()))


class _Request:
    """A call waiting for the poller thread."""

    def __init__(self, fn: Callable[[Any], Any]) -> None:
        self.fn = fn
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self, consumer: Any) -> None:
        try:
            self.result = self.fn(consumer)
        except BaseException as exc:
            self.error = exc
        self.done.set()

    def cancel(self, exc: BaseException) -> None:
        self.error = exc
        self.done.set()
