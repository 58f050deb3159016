"""The cron trigger: a function runs on a schedule and the rows it returns feed the graph.

    from streamfn.connectors import cron

    readings = p.source(cron.every("10s", poll_api))                # or:
    nightly = p.source(cron.schedule("0 2 * * *", export, timezone="Europe/Berlin"))

`fn()` returns a DataFrame, a pyarrow Table, a list of dicts, a dict or None; a Nuclio-style
`handler(context, event)` works too (event.trigger.kind == "cron"). Runs never overlap: a run
that would start while the previous one is still going is skipped, and the log says so.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from datetime import datetime, timezone as dt_timezone
from typing import TYPE_CHECKING, Any

import polars as pl
import pyarrow as pa

from streamfn._optional import import_optional
from streamfn.batch import Position, as_frame
from streamfn.contracts import Reject, Source, SourcePartition
from streamfn.errors import ConfigError, EndOfInput
from streamfn.events import Context, Event, Logger, TriggerInfo
from streamfn.handler import is_handler
from streamfn.timeparse import parse_duration_s

if TYPE_CHECKING:
    from streamfn.runtime import RunContext

log = logging.getLogger("streamfn.cron")

Fn = Callable[..., Any]


class CronSource(Source):
    """Runs `fn` on a trigger of apscheduler; each run's rows are one batch of partition '0'."""

    def __init__(self, trigger: Any, what: str, fn: Fn, *, max_runs: int | None, timezone: str,
                 misfire_grace_s: float, max_waiting_runs: int, name: str | None,
                 init_context: Callable[[Context], Any] | None) -> None:
        if not callable(fn):
            raise ConfigError(f"{what}: fn must be a function, got {type(fn).__name__}")
        if max_runs is not None and max_runs < 1:
            raise ConfigError(f"{what}: max_runs must be at least 1, got {max_runs}")
        self._trigger, self._what, self._fn = trigger, what, fn
        self.max_runs, self.timezone, self.misfire_grace_s = max_runs, timezone, misfire_grace_s
        self._name = name or getattr(fn, "__name__", "cron").strip("<>") or "cron"
        self._handler = is_handler(fn)
        self._context = Context(Logger(base={"source": self._name})) if self._handler else None
        self._init_context = init_context
        self._ready: deque[pl.DataFrame | Reject] = deque()
        self._room = threading.Semaphore(max_waiting_runs)  # bounded: a slow graph holds the next run
        self._lock = threading.Lock()
        self._started_runs = 0
        self._finished_runs = 0
        self._ctx: RunContext | None = None
        self._scheduler: Any = None

    def default_name(self) -> str:
        return self._name

    def describe(self) -> str:
        limit = f", max_runs={self.max_runs}" if self.max_runs else ""
        return f"{self._what}{limit}"

    # -- Source -------------------------------------------------------------------------------
    def start(self, ctx: "RunContext") -> None:
        background = import_optional("apscheduler.schedulers.background", extra="cron")
        events = import_optional("apscheduler.events", extra="cron")
        self._ctx = ctx
        if ctx.until_idle and self.max_runs is None:
            log.warning("a schedule without max_runs never ends; --until-idle waits for it until "
                        "stopped", extra={"source": self._name})
        self._scheduler = background.BackgroundScheduler(timezone=self.timezone)
        self._scheduler.add_job(self._run, self._trigger, id=self._name, name=self._name, max_instances=1,
                                coalesce=True, misfire_grace_time=max(1, round(self.misfire_grace_s)))
        self._scheduler.add_listener(self._on_event, events.EVENT_JOB_MAX_INSTANCES | events.EVENT_JOB_MISSED)
        self._scheduler.start()
        log.info("schedule started", extra={"source": self._name, "schedule": self._what,
                                            "timezone": self.timezone})

    def partitions(self) -> Sequence[str]:
        return ["0"]

    def open(self, partition: str, resume: Position) -> SourcePartition:
        return _CronPartition(self, resume)

    def exhausted(self) -> bool:
        return self._done()

    def stop(self) -> None:
        if self._scheduler is not None and self._scheduler.running:
            self._scheduler.shutdown(wait=False)  # a run still going finishes on its own thread
        self._scheduler = None

    # -- runs (scheduler threads) -------------------------------------------------------------
    def _run(self) -> None:
        with self._lock:
            if self.max_runs is not None and self._started_runs >= self.max_runs:
                return
            self._started_runs += 1
            run = self._started_runs
            last = self.max_runs is not None and run >= self.max_runs
        if last and self._scheduler is not None:
            self._scheduler.pause_job(self._name)
        started = time.perf_counter()
        try:
            item: pl.DataFrame | Reject | None = self._rows(self._call())
        except Exception as exc:
            log.error("cron run failed", exc_info=True, extra={"source": self._name, "run": run})
            item = Reject(f"run {run}", "", f"{type(exc).__name__}: {exc}")
        while not self._room.acquire(timeout=0.1):
            if self._ctx is None or self._ctx.stopping:
                return
        if item is None:
            self._room.release()
        else:
            self._ready.append(item)
        with self._lock:
            self._finished_runs += 1
        log.debug("cron run finished", extra={"source": self._name, "run": run,
                                              "seconds": round(time.perf_counter() - started, 3)})
        if self._ctx is not None:
            self._ctx.wake(self, "0")

    def _call(self) -> Any:
        if self._context is None:
            return self._fn()
        self._context.initialise(self._init_context)
        event = Event(trigger=TriggerInfo("cron", self._name), method="", path="",
                      timestamp=datetime.now(dt_timezone.utc))
        return self._fn(self._context, event)

    def _rows(self, value: Any) -> pl.DataFrame | None:
        if value is None:
            return None
        if isinstance(value, (pl.DataFrame, pl.LazyFrame, pa.Table, pa.RecordBatch)):
            frame = as_frame(value)
        elif isinstance(value, dict):
            frame = pl.from_dicts([value])
        elif isinstance(value, list) and all(isinstance(v, dict) for v in value):
            frame = pl.from_dicts(value, infer_schema_length=None) if value else pl.DataFrame()
        else:
            raise TypeError(f"a cron function returns a DataFrame, a list of dicts, a dict or None; "
                            f"got {type(value).__name__}")
        return frame if frame.height else None

    def _on_event(self, event: Any) -> None:
        events = import_optional("apscheduler.events", extra="cron")
        if event.code == events.EVENT_JOB_MAX_INSTANCES:
            log.warning("cron run skipped: the previous run is still going", extra={
                "source": self._name, "scheduled": str(event.scheduled_run_times[0])})
        else:
            log.warning("cron run missed: it was due more than misfire_grace ago", extra={
                "source": self._name, "scheduled": str(event.scheduled_run_time)})

    # -- the lane's side ----------------------------------------------------------------------
    def _done(self) -> bool:
        with self._lock:
            finished = self.max_runs is not None and self._finished_runs >= self.max_runs
        return finished and not self._ready

    def take(self) -> pl.DataFrame | Reject | None:
        """The output of the oldest run not yet read."""
        try:
            item = self._ready.popleft()
        except IndexError:
            return None
        self._room.release()
        return item


class _CronPartition(SourcePartition):
    def __init__(self, source: CronSource, resume: Position) -> None:
        self._source = source
        self._rows = int(resume) if isinstance(resume, int) else 0  # position: rows handed out
        self._rejects: list[Reject] = []

    def next_batch(self, max_rows: int) -> pl.DataFrame | None:
        while True:
            item = self._source.take()
            if item is None:
                if self._source._done():  # noqa: SLF001
                    raise EndOfInput()
                return None
            if isinstance(item, Reject):
                self._rejects.append(item)
                continue
            self._rows += item.height
            return item

    def position(self) -> Position:
        return self._rows

    def take_rejects(self) -> list[Reject]:
        rejects, self._rejects = self._rejects, []
        return rejects


def schedule(expr: str, fn: Fn, *, max_runs: int | None = None, timezone: str = "UTC",
             misfire_grace: str | float = "1s", max_waiting_runs: int = 16, name: str | None = None,
             init_context: Callable[[Context], Any] | None = None) -> CronSource:
    """Run `fn` on a crontab schedule ('*/5 * * * *': minute hour day month weekday)."""
    triggers = import_optional("apscheduler.triggers.cron", extra="cron")
    try:
        fields = expr.split()
        if len(fields) != 5:
            raise ValueError(f"it has {len(fields)} fields")
        minute, hour, day, month, weekday = fields
        trigger = triggers.CronTrigger(minute=minute, hour=hour, day=day, month=month,
                                       day_of_week=crontab_weekdays(weekday), timezone=timezone)
    except (ValueError, LookupError) as exc:
        raise ConfigError(f"invalid cron expression {expr!r} or timezone {timezone!r}: {exc}; expected "
                          "five fields 'minute hour day month weekday', e.g. '*/5 * * * *'") from None
    return CronSource(trigger, f"cron.schedule({expr!r})", fn, max_runs=max_runs, timezone=timezone,
                      misfire_grace_s=parse_duration_s(misfire_grace), max_waiting_runs=max_waiting_runs,
                      name=name, init_context=init_context)


_DAYS = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"]


def crontab_weekdays(field: str) -> str:
    """A crontab weekday field (0 or 7 = Sunday) as apscheduler's day names.

    apscheduler 3 numbers days from Monday = 0, so '1-5' would mean Tuesday to Saturday;
    names say the same thing to both.
    """
    if field == "*":
        return "*"
    days: set[int] = set()
    for part in field.lower().split(","):
        spec, _, step_text = part.partition("/")
        step = int(step_text) if step_text else 1
        if spec == "*":
            first, last = 0, 6
        else:
            low, _, high = spec.partition("-")
            first = _day_number(low)
            last = _day_number(high) if high else (6 if step_text else first)
            if high and last == 0:  # '5-0' / '5-7': through Sunday
                last = 7
        if step < 1 or last < first:
            raise ValueError(f"cannot read the weekday field {field!r}")
        days.update(d % 7 for d in range(first, last + 1, step))
    return ",".join(_DAYS[d] for d in sorted(days))


def _day_number(text: str) -> int:
    if text[:3] in _DAYS:
        return _DAYS.index(text[:3])
    number = int(text)
    if not 0 <= number <= 7:
        raise ValueError(f"weekday {number} is not 0-7")
    return number


def every(interval: str | float, fn: Fn, *, max_runs: int | None = None, timezone: str = "UTC",
          misfire_grace: str | float = "1s", max_waiting_runs: int = 16, name: str | None = None,
          init_context: Callable[[Context], Any] | None = None) -> CronSource:
    """Run `fn` every `interval` ('10s', '250ms', '5m'); the first run is one interval after start."""
    seconds = parse_duration_s(interval)
    if seconds <= 0:
        raise ConfigError(f"cron.every() needs an interval above zero, got {interval!r}")
    triggers = import_optional("apscheduler.triggers.interval", extra="cron")
    trigger = triggers.IntervalTrigger(seconds=seconds, timezone=timezone)
    return CronSource(trigger, f"cron.every({interval!r})", fn, max_runs=max_runs, timezone=timezone,
                      misfire_grace_s=parse_duration_s(misfire_grace), max_waiting_runs=max_waiting_runs,
                      name=name, init_context=init_context)
