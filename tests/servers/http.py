"""Run a pipeline with HTTP triggers on a thread, over loopback, for the length of a `with` block."""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from streamfn.pipeline import Pipeline
from streamfn.runtime import Runtime
from streamfn.summary import RunSummary


@dataclass
class Serving:
    """A running pipeline: its runtime, and after the block its summary or error."""

    runtime: Runtime
    summary: RunSummary | None = None
    error: BaseException | None = None
    thread: threading.Thread | None = field(default=None, repr=False)

    def url(self, source: str) -> str:
        """The URL of an HTTP source node (its real port)."""
        return self.runtime.pipeline.node(source).connector.url  # type: ignore[union-attr]


@contextmanager
def serving(pipeline: Pipeline, *, settings: Mapping[str, str] | None = None,
            timeout_s: float = 20.0) -> Iterator[Serving]:
    """Start the pipeline, wait until every HTTP source has a lane, yield, then stop and join."""
    runtime = Runtime(pipeline, until_idle=False, settings=settings or {}, handle_signals=False)
    state = Serving(runtime)

    def run() -> None:
        try:
            state.summary = runtime.run()
        except BaseException as exc:  # reported by the test
            state.error = exc

    state.thread = threading.Thread(target=run, name="test-pipeline", daemon=True)
    state.thread.start()
    deadline = time.monotonic() + timeout_s
    sources = [n.connector for n in pipeline.nodes if n.kind == "source"]
    while not all(_ready(s) for s in sources):
        if state.error is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the pipeline did not start: {state.error!r}")
        time.sleep(0.01)
    try:
        yield state
    finally:
        runtime.stop("test finished")
        state.thread.join(timeout_s)


def _ready(source: Any) -> bool:
    ready = getattr(source, "_ready", None)
    return bool(ready()) if callable(ready) else True
