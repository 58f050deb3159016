"""Progress of a run: redrawn in place on a terminal, a periodic log line otherwise."""
from __future__ import annotations

import logging
import sys
import threading
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from streamfn.observe.monitor import Monitor

log = logging.getLogger("streamfn.progress")

_LOG_EVERY_S = 10.0
_UP_AND_CLEAR = "\x1b[{n}F\x1b[J"  # cursor to the start of the line n lines up, clear below


def _count(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}" if isinstance(n, float) else str(n)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    return f"{seconds:.0f}s ago" if seconds < 120 else f"{seconds / 60:.0f}m ago"


def render_lines(status: dict[str, Any], *, width: int = 100) -> list[str]:
    """The status document as lines of text (the progress view and `streamfn status`)."""
    checkpoint = status.get("last_checkpoint")
    head = (f"{status.get('pipeline')}  {status.get('state')}  health={status.get('health')}  "
            f"up {status.get('uptime_s', 0):.0f}s  lanes {status.get('lanes_open', 0)}  "
            f"dead letters {status.get('dead_letters', 0):,}  "
            + (f"lag {_count(status['lag_total'])}  " if status.get("lag_total") is not None else "")
            + "last checkpoint "
            + (f"{_age(checkpoint['age_s'])} ({checkpoint['id']})" if checkpoint else "never"))
    lines = [head[:width]]
    if status.get("error"):
        lines.append(f"  error: {status['error']}"[:width])
    nodes = status.get("nodes", [])
    name_w = max([len(n["name"]) for n in nodes] + [5])
    lines.append(f"  {'node':<{name_w}}  {'kind':<6} {'rows/s in':>10} {'rows/s out':>10} "
                 f"{'rows in':>10} {'rows out':>10} {'errors':>7}")
    for n in nodes:
        lines.append(f"  {n['name']:<{name_w}}  {n['kind']:<6} {_count(n['rows_in_per_s']):>10} "
                     f"{_count(n['rows_out_per_s']):>10} {_count(n['rows_in']):>10} "
                     f"{_count(n['rows_out']):>10} {n['errors']:>7,}"[:width])
    parts = status.get("partitions", [])
    if parts:
        shown = parts[:8]
        lag = "  ".join(f"{p['lane']} @{p['position']}" + (f" lag {_count(p['lag'])}" if p["lag"] is not None
                                                            else "") for p in shown)
        more = f"  (+{len(parts) - len(shown)} more)" if len(parts) > len(shown) else ""
        lines.append(f"  partitions: {lag}{more}"[:width])
    return lines


class _Terminal:
    """Redraws a block of lines at the bottom of a terminal; other output goes above it."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.lock = threading.RLock()
        self.drawn = 0

    def draw(self, lines: list[str]) -> None:
        with self.lock:
            self._clear()
            self.stream.write("\n".join(lines) + "\n")
            self.stream.flush()
            self.drawn = len(lines)

    def _clear(self) -> None:
        if self.drawn:
            self.stream.write(_UP_AND_CLEAR.format(n=self.drawn))
            self.drawn = 0

    def write_above(self, write: Any, text: str, lines: list[str]) -> None:
        """Write `text` (a log record) above the block, then draw the block again."""
        with self.lock:
            self._clear()
            self.stream.flush()
            write(text)
            self.draw(lines)


class _Above:
    """Stands in for a log handler's stream so its lines go above the live block."""

    def __init__(self, terminal: _Terminal, inner: TextIO, progress: "Progress") -> None:
        self._terminal, self._inner, self._progress = terminal, inner, progress

    def write(self, text: str) -> int:
        self._terminal.write_above(self._inner.write, text, self._progress.lines())
        return len(text)

    def flush(self) -> None:
        self._inner.flush()


class Progress:
    """Shows a run's progress until closed."""

    def __init__(self, monitor: "Monitor", *, stream: TextIO | None = None, width: int | None = None) -> None:
        self.monitor = monitor
        self.stream = stream or sys.stdout
        self.live = bool(getattr(self.stream, "isatty", lambda: False)())
        self.width = width or _terminal_width(self.stream)
        self.interval_s = monitor.interval_s if self.live else _LOG_EVERY_S
        self._terminal = _Terminal(self.stream) if self.live else None
        self._swapped: list[tuple[logging.StreamHandler[Any], Any]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def lines(self) -> list[str]:
        """The current view as lines."""
        return render_lines(self.monitor.status(), width=self.width)

    def start(self) -> None:
        """Start redrawing (or logging) on a background thread."""
        if self._thread is not None:
            return
        if self._terminal is not None:
            self._route_logs_above()
        self._thread = threading.Thread(target=self._loop, name="streamfn-progress", daemon=True)
        self._thread.start()

    def _route_logs_above(self) -> None:
        # Log lines written to the same terminal would scroll the block away; print them above it.
        assert self._terminal is not None
        for handler in logging.getLogger("streamfn").handlers:
            inner = getattr(handler, "stream", None)
            if isinstance(handler, logging.StreamHandler) and inner is not None and _is_tty(inner):
                self._swapped.append((handler, inner))
                handler.setStream(_Above(self._terminal, inner, self))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.draw()

    def draw(self, *, final: bool = False) -> None:
        """Redraw the view now (or log a progress line when not on a terminal)."""
        if self._terminal is not None:
            self._terminal.draw(self.lines())
            return
        status = self.monitor.status()
        rates = {n["name"]: round(n["rows_out_per_s"], 1) for n in status["nodes"]}
        checkpoint = status.get("last_checkpoint")
        log.info("progress (final)" if final else "progress", extra={
            "pipeline": status["pipeline"], "state": status["state"], "rows_per_s": rates,
            "rows_out": {n["name"]: n["rows_out"] for n in status["nodes"]},
            "lag": status.get("lag_total"), "dead_letters": status["dead_letters"],
            "checkpoint": checkpoint["id"] if checkpoint else None})

    def close(self) -> None:
        """Stop, draw the last view, and give the log handlers their streams back."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for handler, inner in self._swapped:
            handler.setStream(inner)
        self._swapped.clear()


def _is_tty(stream: Any) -> bool:
    return bool(getattr(stream, "isatty", lambda: False)())


def _terminal_width(stream: Any) -> int:
    import os

    try:
        columns = os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return 120
    return columns if columns >= 40 else 120  # a pseudo-terminal may say 0
