"""Window and state specs: pure values that say *what* a stateful stage keeps.

    sf.tumbling("1s")            fixed, non-overlapping windows
    sf.hopping("10s", "2s")      fixed windows of 10 s starting every 2 s (overlapping)
    sf.sliding("5s")             per record: the same key's records in the last 5 s
    sf.session("30s")            a key's records separated by less than 30 s of silence
    sf.table(key="symbol", schema={...}, ttl="1h")   a keyed state table for @p.stage(state=...)

The maths that uses them lives in `streamfn.stateful`; the core only carries them.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from streamfn.errors import ConfigError
from streamfn.timeparse import parse_duration_ms

Duration = str | float | int | timedelta


def _positive_ms(value: Duration, what: str) -> int:
    ms = parse_duration_ms(value)
    if ms <= 0:
        raise ConfigError(f"{what} must be longer than 0 ms, got {value!r}")
    return ms


@dataclass(frozen=True, slots=True)
class Tumbling:
    """Fixed, non-overlapping event-time windows aligned to the epoch."""

    size_ms: int
    kind: str = "tumbling"


@dataclass(frozen=True, slots=True)
class Hopping:
    """Fixed windows of size_ms that start every every_ms (they overlap when every < size)."""

    size_ms: int
    every_ms: int
    kind: str = "hopping"


@dataclass(frozen=True, slots=True)
class Sliding:
    """One result per record: the aggregate of its key's records in (ts - size, ts]."""

    size_ms: int
    kind: str = "sliding"


@dataclass(frozen=True, slots=True)
class Session:
    """A key's records whose gaps are shorter than gap_ms; the session ends gap_ms after its last one."""

    gap_ms: int
    kind: str = "session"


WindowSpec = Tumbling | Hopping | Sliding | Session


@dataclass(frozen=True)
class TableSpec:
    """A keyed state table handed to a stage function as its second argument."""

    key: tuple[str, ...]
    schema: Mapping[str, Any] | None = None
    ttl_ms: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def tumbling(size: Duration) -> Tumbling:
    """Fixed windows of `size` ("1s", "5m", ...), aligned to the epoch."""
    return Tumbling(_positive_ms(size, "a tumbling window's size"))


def hopping(size: Duration, every: Duration) -> Hopping:
    """Windows of `size` starting every `every`; a record falls in size/every of them."""
    size_ms = _positive_ms(size, "a hopping window's size")
    every_ms = _positive_ms(every, "a hopping window's step")
    if every_ms > size_ms:
        raise ConfigError(f"a hopping window's step ({every!r}) is longer than its size ({size!r}); "
                          "records between windows would be lost: use every <= size")
    return Hopping(size_ms, every_ms)


def sliding(size: Duration) -> Sliding:
    """Per record, aggregate its key's records of the last `size` (ending at the record)."""
    return Sliding(_positive_ms(size, "a sliding window's size"))


def session(gap: Duration) -> Session:
    """Sessions per key that close after `gap` without a record."""
    return Session(_positive_ms(gap, "a session gap"))


def table(*, key: str | Sequence[str], schema: Mapping[str, Any] | None = None,
          ttl: Duration | None = None) -> TableSpec:
    """A keyed state table: `@p.stage(node, state=sf.table(key="symbol"))` gets `fn(df, state)`."""
    keys = (key,) if isinstance(key, str) else tuple(key)
    if not keys or not all(isinstance(k, str) and k for k in keys):
        raise ConfigError(f"sf.table(key=...) takes a column name or a list of them, got {key!r}")
    ttl_ms = None if ttl is None else _positive_ms(ttl, "a state TTL")
    if schema is not None:
        missing = [k for k in keys if k not in schema]
        if missing:
            raise ConfigError(f"sf.table: the key column(s) {missing} are not in the schema "
                              f"({', '.join(schema)})")
    return TableSpec(keys, dict(schema) if schema is not None else None, ttl_ms)
