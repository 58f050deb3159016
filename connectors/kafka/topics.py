"""Topic checks at start: the broker is there (bounded wait), the topics exist or are created."""
from __future__ import annotations

import time
from typing import Any

from streamfn._optional import import_optional
from streamfn.errors import ConfigError, StreamfnError


class BrokerUnavailable(StreamfnError):
    """No Kafka broker answered within the connect timeout."""


class TopicMissing(ConfigError):
    """A topic the pipeline names does not exist (and create=True was not given)."""


def kafka() -> Any:
    """confluent_kafka, or a MissingDependency naming the extra."""
    return import_optional("confluent_kafka", extra="kafka")


def _admin(brokers: str, timeout_s: float, extra: dict[str, Any]) -> Any:
    admin_mod = import_optional("confluent_kafka.admin", extra="kafka")
    keep = {k: v for k, v in extra.items() if k.startswith(("security.", "sasl.", "ssl.", "client."))}
    return admin_mod.AdminClient({"bootstrap.servers": brokers, "socket.connection.setup.timeout.ms":
                                  max(1000, int(timeout_s * 1000)), **keep})


def partition_counts(brokers: str, timeout_s: float, extra: dict[str, Any]) -> dict[str, int]:
    """Every topic on the cluster and its number of partitions (without auto-creating any)."""
    admin = _admin(brokers, timeout_s, extra)
    try:
        # list_topics() for all topics: asking for one by name makes some brokers create it
        metadata = admin.list_topics(timeout=timeout_s)
    except kafka().KafkaException as exc:
        raise BrokerUnavailable(f"no Kafka broker answered at {brokers} within {timeout_s:g}s ({exc.args[0]}); "
                                "is it running? (check --brokers, or leave it out to use the embedded "
                                "broker)") from exc
    return {name: len(t.partitions) for name, t in metadata.topics.items() if t.error is None}


def ensure_topics(brokers: str, topics: list[str], *, create: bool, partitions: int,
                  timeout_s: float, extra: dict[str, Any], config: dict[str, str] | None = None) -> dict[str, int]:
    """Check that the topics exist, creating the missing ones when create=True; return partition counts."""
    counts = partition_counts(brokers, timeout_s, extra)
    missing = [t for t in topics if t not in counts]
    if missing and not create:
        raise TopicMissing(f"Kafka topic {', '.join(map(repr, missing))} does not exist on {brokers}; create it, "
                           f"or pass create=True, partitions=N to kafka.topic()")
    if missing:
        admin_mod = import_optional("confluent_kafka.admin", extra="kafka")
        admin = _admin(brokers, timeout_s, extra)
        new = [admin_mod.NewTopic(t, num_partitions=partitions, replication_factor=1, config=config or {})
               for t in missing]
        for name, future in admin.create_topics(new, request_timeout=timeout_s).items():
            try:
                future.result(timeout=timeout_s)
            except kafka().KafkaException as exc:
                if "TOPIC_ALREADY_EXISTS" not in str(exc):  # another worker created it first: fine
                    raise ConfigError(f"could not create Kafka topic {name!r}: {exc.args[0]}") from exc
        counts = _wait_visible(brokers, missing, partitions, timeout_s, extra)
    return {t: counts[t] for t in topics}


def _wait_visible(brokers: str, topics: list[str], partitions: int, timeout_s: float,
                  extra: dict[str, Any]) -> dict[str, int]:
    deadline = time.monotonic() + timeout_s
    while True:
        counts = partition_counts(brokers, timeout_s, extra)
        if all(counts.get(t, 0) >= 1 for t in topics) or time.monotonic() > deadline:
            return {t: counts.get(t, partitions) for t in topics} | counts
        time.sleep(0.1)
