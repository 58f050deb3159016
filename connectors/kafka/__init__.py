"""Kafka topics as sources and sinks.

    p.source(kafka.topic("ticks", format="json", schema={"price": pl.Float64, ...}))
    node.sink(kafka.topic("vwap", format="arrow", key="symbol"))

As a source: a consumer in a consumer group, one lane per assigned partition, offsets
committed after the lane's sinks flushed. As a sink: an idempotent producer whose
deliveries are checked at every checkpoint (or one transaction per checkpoint with
transactional=True). Without --brokers a local broker is started for the run.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from streamfn.connectors.kafka.config import split_client_kwargs
from streamfn.connectors.kafka.topic import KafkaTopic

__all__ = ["topic", "KafkaTopic"]


def topic(name: str | Sequence[str], format: str = "json", *, schema: Any = None, key: str | None = None,
          group: str | None = None, start: str = "committed", include: Sequence[str] = (),
          brokers: str | None = None, create: bool = False, partitions: int = 1,
          transactional: bool = False, timeout: str | float = "10s", consume_batch: int = 10_000,
          queue_messages: int = 50_000, max_message_bytes: int = 900_000, delivery_retries: int = 2,
          tune_gc: bool = True, stop_with_writers: bool = False, config: Mapping[str, Any] | None = None,
          **client_config: Any) -> KafkaTopic:
    """A Kafka topic (or, as a source, several): a source when given to p.source, a sink to .sink.

    Args:
        name: the topic; a source may read a list of topics.
        format: "json" (one object per message), "csv" (one line), "arrow" (an Arrow IPC stream
            per message, many rows each) or "raw" (a `value` column of bytes).
        schema: column name -> polars type; inferred from the first block when None.
        key: the column whose value is the message key (sink); the source's partitioning key.
        group: the consumer group (default: --group, else "streamfn-<pipeline>").
        start: "committed" (the group's offset, else earliest), "earliest" or "latest".
        include: metadata columns to add to a source's rows: key, partition, offset,
            timestamp, headers (named kafka_key, kafka_partition, ...).
        brokers: bootstrap servers (default: --brokers, else an embedded broker).
        create: create missing topics with `partitions` partitions (else a missing topic is an error).
        transactional: sink only: one Kafka transaction per checkpoint (exactly-once with a Kafka source).
        timeout: how long to wait for the broker at start, and for admin and transaction calls.
        consume_batch: messages per consume() call; queue_messages: per-partition read-ahead bound.
        max_message_bytes: the size an Arrow message is cut at; delivery_retries: sink retries per failure.
        tune_gc: source: raise Python's GC threshold and freeze start-up objects (see docs/kafka.md).
        stop_with_writers: source: end (in any run, not only --until-idle) once the Kafka sinks of this
            pipeline that write its topics ended and their records were read (see docs/kafka.md).
        config / **client_config: librdkafka settings (`fetch_wait_max_ms=10` means fetch.wait.max.ms);
            they win over `--set kafka.KEY=VALUE`.
    """
    given = {**dict(config or {}), **split_client_kwargs(client_config)}
    return KafkaTopic(name, format=format, schema=schema, key=key, group=group, start=start, include=include,
                      brokers=brokers, create=create, partitions=partitions, transactional=transactional,
                      timeout=timeout, consume_batch=consume_batch, queue_messages=queue_messages,
                      max_message_bytes=max_message_bytes, delivery_retries=delivery_retries,
                      tune_gc=tune_gc, stop_with_writers=stop_with_writers, client_config=given)
