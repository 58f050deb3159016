"""Bounded retries with exponential back-off and full jitter, one log line per retry.

    from streamfn.retry import Retry

    WRITE = Retry("checkpoint write", attempts=6, base_s=0.2, max_s=10.0)
    WRITE.call(fs.pipe_file, path, data)        # retries OSError; past the limit, RetriesExhausted

For calls to a store or server that can be away for a while (a checkpoint store, a broker's
admin API): a short outage costs a wait, a long one a clear one-line error naming what failed,
how often, and the last error.
"""
from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from streamfn.errors import StreamfnError

log = logging.getLogger("streamfn.retry")

T = TypeVar("T")


class RetriesExhausted(StreamfnError):
    """A call still failed after every retry."""


@dataclass
class Retry:
    """How to retry one kind of call: attempts in all, and the back-off between them."""

    what: str
    attempts: int = 6
    base_s: float = 0.2
    max_s: float = 10.0
    retry_on: tuple[type[BaseException], ...] = (OSError,)
    give_up_on: tuple[type[BaseException], ...] = (FileExistsError, FileNotFoundError, PermissionError)
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False)
    rng: random.Random = field(default_factory=random.Random, repr=False)

    def delay_s(self, attempt: int) -> float:
        """Full jitter: uniform in [0, min(max_s, base_s * 2**attempt)] (workers do not retry in step)."""
        return self.rng.uniform(0.0, min(self.max_s, self.base_s * 2 ** attempt))

    def call(self, fn: Callable[..., T], *args: object, **kwargs: object) -> T:
        """fn(*args, **kwargs), retried on `retry_on` errors; RetriesExhausted past the limit."""
        for attempt in range(self.attempts):
            try:
                return fn(*args, **kwargs)
            except self.give_up_on:
                raise  # an answer, not an outage: retrying would not change it
            except self.retry_on as exc:
                if attempt + 1 >= self.attempts:
                    raise RetriesExhausted(f"{self.what} failed {self.attempts} times; last error: "
                                           f"{type(exc).__name__}: {exc}") from exc
                delay = self.delay_s(attempt)
                log.warning("retrying after an error", extra={
                    "what": self.what, "attempt": attempt + 1, "of": self.attempts,
                    "delay_s": round(delay, 3), "error": f"{type(exc).__name__}: {exc}"})
                self.sleep(delay)
        raise AssertionError("unreachable")  # the loop returns or raises
