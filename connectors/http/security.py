"""Who may call an endpoint, and how often: a token check (API key or bearer) and a rate limit.

Secrets are given as `env:NAME` (an environment variable), `file:PATH` (the file's first line),
or the value itself; they are resolved once at start and never logged or shown in errors.
"""
from __future__ import annotations

import hmac
import json
import time
from collections.abc import Callable

from streamfn.errors import ConfigError

Answer = tuple[int, bytes, str, dict[str, str]]
HeaderReader = Callable[[bytes], str | None]


def _deny(status: int, message: str, headers: dict[str, str]) -> Answer:
    return status, json.dumps({"error": message}).encode(), "application/json", headers


class TokenCheck:
    """Accepts `Authorization: Bearer <token>` or `X-API-Key: <token>`; anything else gets 401."""

    __slots__ = ("_token",)

    def __init__(self, token: str) -> None:
        self._token = token.encode()

    def __repr__(self) -> str:
        return "TokenCheck(<redacted>)"  # never the token itself

    def check(self, header: HeaderReader) -> Answer | None:
        """None when the request carries the token, else the 401 answer."""
        given = header(b"x-api-key")
        if given is None:
            auth = header(b"authorization") or ""
            scheme, _, value = auth.partition(" ")
            given = value.strip() if scheme.lower() == "bearer" else None
        # constant time: the comparison must not tell how much of a guess was right
        if given is not None and hmac.compare_digest(given.encode("latin-1", "replace"), self._token):
            return None
        return _deny(401, "missing or wrong credentials: send 'Authorization: Bearer <token>' or "
                          "'X-API-Key: <token>'", {"www-authenticate": "Bearer"})


class RateLimit:
    """A token bucket: `rate` requests a second on average, bursts of up to `burst`; over it, 429.

    Used on the server's event loop thread only, so it needs no lock.
    """

    __slots__ = ("_at", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float | None = None) -> None:
        if rate <= 0:
            raise ConfigError(f"rate_limit must be above 0 requests a second, got {rate}")
        self.rate = rate
        self.burst = max(1.0, burst if burst is not None else rate)
        self._tokens = self.burst
        self._at = time.monotonic()

    def check(self) -> Answer | None:
        """None when a request may go on, else the 429 answer with Retry-After."""
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return None
        retry_s = max(1, int((1.0 - self._tokens) / self.rate + 0.999))
        return _deny(429, f"over the rate limit of {self.rate:g} requests/s; retry later",
                     {"retry-after": str(retry_s)})


def parse_rate(value: str | float | None) -> float | None:
    """A rate limit from an option or setting: requests per second, or 'N/s', 'N/min'."""
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)):
        return float(value)
    text = value.strip().lower()
    per = 1.0
    for suffix, seconds in (("/s", 1.0), ("/sec", 1.0), ("/min", 60.0), ("/m", 60.0)):
        if text.endswith(suffix):
            text, per = text[: -len(suffix)], seconds
            break
    try:
        return float(text) / per
    except ValueError:
        raise ConfigError(f"rate_limit must be requests per second (e.g. 100 or '6000/min'), got {value!r}") \
            from None


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach."""
    return host in ("localhost", "::1") or host.startswith("127.")
