"""The Nuclio-style handler model's objects: Context, Event, Response and the structured logger."""
from __future__ import annotations

import logging
import sys
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from types import SimpleNamespace
from typing import Any, TextIO

_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


@dataclass
class TriggerInfo:
    """Which trigger delivered an event: `kind` ('http', 'cron', 'kafka', ...) and its name."""

    kind: str = "http"
    name: str = ""

    def __str__(self) -> str:
        return self.kind


@dataclass
class Response:
    """What a handler may return to set the status, headers and content type of its answer."""

    body: Any = None
    headers: dict[str, str] | None = None
    content_type: str | None = None
    status_code: int = 200


@dataclass
class Event:
    """One event a handler gets; the constructor takes Nuclio's arguments (`_id` or `id`)."""

    body: Any = None
    content_type: str | None = None
    trigger: TriggerInfo | str | None = None
    fields: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, Any] = field(default_factory=dict)
    _id: str | None = None
    method: str = "POST"
    path: str = "/"
    size: int | None = None
    timestamp: datetime | None = None
    url: str = ""
    _type: str = ""
    type_version: str = ""
    version: str = ""
    last_in_batch: bool = False
    offset: int = 0
    id: str | None = None

    def __post_init__(self) -> None:
        self.id = self.id or self._id
        self._id = self.id
        if not isinstance(self.trigger, TriggerInfo):
            self.trigger = TriggerInfo(self.trigger or "http")
        self.timestamp = self.timestamp or datetime.now(timezone.utc)
        self.headers = dict(self.headers or {})
        self.fields = dict(self.fields or {})
        if self.size is None and isinstance(self.body, (bytes, str)):
            self.size = len(self.body)

    def get_header(self, name: str) -> Any:
        """A header's value, matched without regard to case (None when absent)."""
        wanted = name.lower()
        return next((v for k, v in self.headers.items() if k.lower() == wanted), None)


class Logger:
    """`context.logger`: debug/info/warn/error and their `*_with(message, **fields)` forms."""

    def __init__(self, logger: logging.Logger | None = None, *, base: dict[str, Any] | None = None) -> None:
        self._log = logger or logging.getLogger("streamfn.handler")
        self._base = dict(base or {})

    def _emit(self, level: int, message: str, args: tuple[Any, ...], fields: dict[str, Any]) -> None:
        extra = {(k if k not in _RESERVED else f"field_{k}"): v for k, v in {**self._base, **fields}.items()}
        self._log.log(level, message, *args, extra=extra)

    def debug(self, message: str, *args: Any) -> None:
        self._emit(logging.DEBUG, message, args, {})

    def info(self, message: str, *args: Any) -> None:
        self._emit(logging.INFO, message, args, {})

    def warn(self, message: str, *args: Any) -> None:
        self._emit(logging.WARNING, message, args, {})

    warning = warn

    def error(self, message: str, *args: Any) -> None:
        self._emit(logging.ERROR, message, args, {})

    def debug_with(self, message: str, /, *args: Any, **fields: Any) -> None:
        self._emit(logging.DEBUG, message, args, fields)

    def info_with(self, message: str, /, *args: Any, **fields: Any) -> None:
        self._emit(logging.INFO, message, args, fields)

    def warn_with(self, message: str, /, *args: Any, **fields: Any) -> None:
        self._emit(logging.WARNING, message, args, fields)

    warning_with = warn_with

    def error_with(self, message: str, /, *args: Any, **fields: Any) -> None:
        self._emit(logging.ERROR, message, args, fields)


class PrintHandler(logging.Handler):
    """Shows a handler's log lines in a notebook or a test: `info  message  key=value`."""

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__(logging.DEBUG)
        self.stream = stream
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        fields = {k: v for k, v in vars(record).items() if k not in _RESERVED}
        text = " ".join(f"{k}={v}" for k, v in fields.items())
        line = f"{record.levelname.lower():<7} {record.getMessage()}" + (f"  {text}" if text else "")
        print(line, file=self.stream or sys.stdout)


class Context:
    """`context` of a handler: logger, user_data (set up by init_context), state, Response."""

    Response = Response

    def __init__(self, logger: Logger | logging.Logger | None = None, *, user_data: Any = None,
                 state: Any = None, platform: Any = None, worker_id: int = 0,
                 trigger: TriggerInfo | None = None) -> None:
        if isinstance(logger, logging.Logger) or logger is None:
            logger = Logger(logger)
        self.logger = logger
        self.user_data = user_data if user_data is not None else SimpleNamespace()
        self.state = state
        self.platform = platform
        self.worker_id = worker_id
        self.trigger = trigger
        self._lock = threading.Lock()
        self._initialised = False

    def initialise(self, init_context: Any) -> None:
        """Run `init_context(context)` once (thread-safe)."""
        if self._initialised or init_context is None:
            return
        with self._lock:
            if not self._initialised:
                init_context(self)
                self._initialised = True
