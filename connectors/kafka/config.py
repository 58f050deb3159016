"""Client settings: throughput defaults, `--set kafka.KEY=VALUE`, connector arguments, brokers."""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from streamfn.errors import ConfigError
from streamfn.secrets import SECRET_PREFIXES, resolve_secret

# Without these a Python consumer tops out far below what the broker serves: librdkafka backs
# off for 1 s once its prefetch queue is full, and its fetches stay small (see docs/kafka.md).
CONSUMER_DEFAULTS: dict[str, Any] = {
    "enable.auto.commit": False,  # offsets are committed by the lanes, after their sinks flushed
    "enable.auto.offset.store": False,
    "auto.offset.reset": "earliest",
    "fetch.queue.backoff.ms": 10,
    "fetch.max.bytes": 64 << 20,
    "max.partition.fetch.bytes": 16 << 20,
    "queued.min.messages": 100_000,
    "queued.max.messages.kbytes": 64 << 10,
    "fetch.wait.max.ms": 50,
    # some brokers answer a fetch with a whole partition whatever the limits say
    "receive.message.max.bytes": 1 << 30,
    "session.timeout.ms": 10_000,
    "heartbeat.interval.ms": 2_000,
}
PRODUCER_DEFAULTS: dict[str, Any] = {
    "enable.idempotence": True,
    "acks": "all",
    "linger.ms": 20,
    "batch.num.messages": 100_000,
    "queue.buffering.max.messages": 1_000_000,
    "partitioner": "murmur2_random",  # the Java client's partitioner: same key, same partition
}
# The embedded broker (Tansu) completes a group join only after session.timeout.ms / 2.
EMBEDDED_CONSUMER: dict[str, Any] = {"session.timeout.ms": 1_000, "heartbeat.interval.ms": 200}

# librdkafka warns about (and ignores) a property of the other role: a `--set kafka.KEY` meant for
# one role is not given to the other
_CONSUMER_ONLY = ("group.", "session.timeout.ms", "heartbeat.interval.ms", "max.poll.interval.ms", "auto.",
                  "enable.auto.", "enable.partition.eof", "fetch.", "queued.", "max.partition.fetch.bytes",
                  "isolation.level", "partition.assignment.strategy", "check.crcs", "consume.callback.max.messages",
                  "offset.store.", "enable.metrics.push")
_PRODUCER_ONLY = ("acks", "request.required.acks", "linger.ms", "queue.buffering.", "batch.", "enable.idempotence",
                  "transactional.id", "transaction.timeout.ms", "compression.", "partitioner", "message.timeout.ms",
                  "delivery.", "retries", "message.send.max.retries", "retry.backoff", "request.timeout.ms",
                  "sticky.partitioning.linger.ms", "enable.gapless.guarantee", "dr_")


def for_role(key: str, role: str) -> bool:
    """Whether a librdkafka property applies to this role (consumer or producer)."""
    other = _PRODUCER_ONLY if role == "consumer" else _CONSUMER_ONLY
    return not any(key == p or (p.endswith((".", "_")) and key.startswith(p)) for p in other)


# streamfn's own keys under the kafka. prefix: not passed to librdkafka
STREAMFN_KEYS = {"brokers", "group"}


def to_client_key(name: str) -> str:
    """`session_timeout_ms` (a Python keyword argument) -> `session.timeout.ms`."""
    return name.replace("_", ".")


def brokers_from(explicit: str | None, settings: Mapping[str, str]) -> str | None:
    """The bootstrap servers: the connector's argument, `--brokers`, `--set kafka.bootstrap.servers`,
    or $STREAMFN_KAFKA_BROKERS; None means none are configured (use the embedded broker)."""
    return (explicit or settings.get("kafka.brokers") or settings.get("kafka.bootstrap.servers")
            or os.environ.get("STREAMFN_KAFKA_BROKERS") or None)


def settings_config(settings: Mapping[str, str], role: str) -> dict[str, Any]:
    """librdkafka settings from `--set kafka.KEY=V`, and `kafka.consumer.KEY` / `kafka.producer.KEY` for one role."""
    conf: dict[str, Any] = {}
    scoped: dict[str, Any] = {}
    for key, value in settings.items():
        if not key.startswith("kafka."):
            continue
        rest = key[len("kafka."):]
        if rest in STREAMFN_KEYS or rest == "bootstrap.servers":
            continue
        head, _, tail = rest.partition(".")
        if head in ("consumer", "producer"):
            if head == role and tail:
                scoped[tail] = value
        else:
            conf[rest] = value
    conf.update(scoped)
    return conf


def client_config(role: str, *, brokers: str, embedded: bool, settings: Mapping[str, str],
                  given: Mapping[str, Any]) -> dict[str, Any]:
    """Defaults < embedded-broker settings < `--set kafka.*` < the connector's own arguments."""
    if role not in ("consumer", "producer"):
        raise ValueError(role)
    conf: dict[str, Any] = dict(CONSUMER_DEFAULTS if role == "consumer" else PRODUCER_DEFAULTS)
    if embedded and role == "consumer":
        conf.update(EMBEDDED_CONSUMER)
    conf.update({k: v for k, v in settings_config(settings, role).items() if for_role(k, role)})
    conf.update({k: v for k, v in given.items() if for_role(k, role)})
    conf["bootstrap.servers"] = brokers
    for key, value in conf.items():  # sasl.password=env:KAFKA_PASSWORD or file:/run/secrets/kafka
        if _is_secret(key) and isinstance(value, str) and value.startswith(SECRET_PREFIXES):
            conf[key] = resolve_secret(value, f"the Kafka setting {key}")
    return conf


def _is_secret(key: str) -> bool:
    return "password" in key or "secret" in key or key == "sasl.username"


def split_client_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Connector keyword arguments that are librdkafka settings, keyed the librdkafka way."""
    out: dict[str, Any] = {}
    for name, value in kwargs.items():
        if not isinstance(name, str) or not name:
            raise ConfigError(f"kafka.topic(): bad client setting name {name!r}")
        out[to_client_key(name)] = value
    return out
