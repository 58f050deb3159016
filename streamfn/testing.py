"""Call a `handler(context, event)` directly, in a notebook or a test, with its logs shown.

    from streamfn.testing import Context, Event

    context = Context()
    init_context(context)                     # if the handler has one
    handler(context, Event(body={"text": "good day"}))

`Event` takes Nuclio's arguments (body, content_type, headers, method, path, trigger, ...),
and `Context()` prints each log line (`info  message  key=value`) and keeps them in
`context.records` for assertions.
"""
from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

from streamfn.events import Context as _Context
from streamfn.events import Event, Logger, PrintHandler, Response, TriggerInfo

__all__ = ["Context", "Event", "Response", "TriggerInfo", "call"]


class Context(_Context):
    """A handler's context whose logger prints to stdout (or `stream`) and keeps the records."""

    def __init__(self, *, user_data: Any = None, state: Any = None, platform: Any = None,
                 stream: TextIO | None = None, level: int = logging.DEBUG, logger: Any = None) -> None:
        self._printer = PrintHandler(stream)
        if logger is None:
            own = logging.getLogger(f"streamfn.testing.{id(self):x}")
            own.handlers[:] = [self._printer]
            own.setLevel(level)
            own.propagate = False
            logger = Logger(own)
        super().__init__(logger, user_data=user_data, state=state, platform=platform)

    @property
    def records(self) -> list[logging.LogRecord]:
        """The log records the handler emitted through this context."""
        return self._printer.records

    def set_logger_level(self, verbose: bool = False) -> None:
        """Show debug lines (verbose) or only info and above, as nuclio-jupyter's Context does."""
        inner = getattr(self.logger, "_log", None)
        if isinstance(inner, logging.Logger):
            inner.setLevel(logging.DEBUG if verbose else logging.INFO)


def call(handler: Any, event: Event | None = None, *, context: Context | None = None,
         init_context: Any = None) -> Any:
    """Call `handler(context, event)` once (running `init_context` first) and return its result."""
    context = context or Context(stream=sys.stdout)
    context.initialise(init_context)
    return handler(context, event or Event())
