"""Durations written as "5s", "250ms", "1m", "2h" or a number of seconds."""
from __future__ import annotations

import re
from datetime import timedelta

from streamfn.errors import ConfigError

_UNITS_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|min|m|h|d)\s*$")


def parse_duration_s(value: str | float | int | timedelta) -> float:
    """Return a duration in seconds; accepts "5s", "100ms", "1m", "2h", "1d", numbers, timedelta."""
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < 0:
            raise ConfigError(f"a duration cannot be negative, got {value}")
        return float(value)
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            return float(match.group(1)) * _UNITS_S[match.group(2)]
    raise ConfigError(f"expected a duration like '5s', '250ms', '1m' or '2h', got {value!r}")


def parse_duration_ms(value: str | float | int | timedelta) -> int:
    """Return a duration in whole milliseconds (numbers are taken as seconds)."""
    return round(parse_duration_s(value) * 1000)
