"""Every error streamfn raises derives from StreamfnError and keeps its context."""
from __future__ import annotations


class StreamfnError(Exception):
    """Base class of streamfn's errors; str() is one line a user can act on."""


class ConfigError(StreamfnError):
    """A pipeline, connector or CLI setting is wrong."""


class GraphError(ConfigError):
    """The pipeline's graph is invalid (unknown upstream, cycle, duplicate name...)."""


class MissingDependency(StreamfnError):
    """An optional dependency that a pip extra provides is not installed."""


class LoadError(StreamfnError):
    """A pipeline file could not be loaded."""


class EndOfInput(StreamfnError):
    """Raised by a finite source partition once it has returned its last row."""


class Backpressure(StreamfnError):
    """Raised by a sink that is full; the lane retries after retry_after_s."""

    def __init__(self, retry_after_s: float = 0.05) -> None:
        super().__init__(f"sink is full; retry after {retry_after_s:g}s")
        self.retry_after_s = retry_after_s


class StageError(StreamfnError):
    """A stage failed in a way that row-wise retry cannot contain."""

    def __init__(self, stage: str, source: str, partition: str, offset: object,
                 cause: BaseException | str) -> None:
        self.stage, self.source, self.partition, self.offset = stage, source, partition, offset
        self.cause = cause
        reason = f"{type(cause).__name__}: {cause}" if isinstance(cause, BaseException) else cause
        super().__init__(f"stage {stage!r} failed on {source}[{partition}] at offset {offset}: {reason}")


class DeadLetterLimit(StreamfnError):
    """More records failed than the pipeline allows."""
