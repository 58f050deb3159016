"""`streamfn run --workers N`: N worker processes of one pipeline, in one consumer group, supervised.

Each worker is the same `streamfn run` command line without --workers, with STREAMFN_WORKER_ID
(0..N-1) and STREAMFN_WORKERS in its environment. The workers share the group id and the
checkpoint URL from that command line, so Kafka's group protocol splits the partitions between
them and state follows its partition through the checkpoint store.

- A worker that exits 0 is done (e.g. `--until-idle` drained its partitions); it is not restarted.
- A worker that fails is restarted after a back-off (0.5 s, doubling to 30 s; reset once it has run
  for a minute). Its partitions move to the other workers meanwhile (a rebalance). After
  `max_failures` failures in a row the supervisor stops everything and exits 1.
- Exit code 2 (a usage error) is not retried: the command line is wrong for every worker.
- SIGTERM or SIGINT to the supervisor is passed on as SIGTERM to every worker, which finishes its
  batch, flushes its sinks, checkpoints and commits; after `drain_timeout_s` the rest are killed.
"""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import FrameType

log = logging.getLogger("streamfn.supervisor")

USAGE_ERROR = 2


@dataclass
class _Worker:
    index: int
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    failures: int = 0           # in a row, without a stable run in between
    restart_at: float | None = None
    done: bool = False
    exit_codes: list[int] = field(default_factory=list)


class Supervisor:
    """Starts, watches, restarts and drains N worker processes."""

    def __init__(self, argv: Sequence[str], workers: int, *, backoff_s: float = 0.5, max_backoff_s: float = 30.0,
                 stable_s: float = 60.0, max_failures: int = 5, drain_timeout_s: float = 120.0,
                 poll_s: float = 0.1) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self.argv = list(argv)
        self.workers = [_Worker(i) for i in range(workers)]
        self.backoff_s, self.max_backoff_s, self.stable_s = backoff_s, max_backoff_s, stable_s
        self.max_failures, self.drain_timeout_s, self.poll_s = max_failures, drain_timeout_s, poll_s
        self.stopping = False
        self.exit_code = 0
        self._wake = threading.Event()

    # -- the loop -------------------------------------------------------------------------------
    def run(self) -> int:
        """Run until every worker is done, or a stop; return the exit code."""
        restore = self._install_signal_handlers()
        try:
            for worker in self.workers:
                self._start(worker)
            while not self.stopping and not all(w.done for w in self.workers):
                self._wake.wait(self.poll_s)
                self._wake.clear()
                for worker in self.workers:
                    self._check(worker)
            self._drain()
        finally:
            restore()
        log.info("workers finished", extra={"exit_code": self.exit_code,
                                            "restarts": sum(max(0, len(w.exit_codes) - 1) for w in self.workers)})
        return self.exit_code

    def _start(self, worker: _Worker) -> None:
        env = {**os.environ, "STREAMFN_WORKER_ID": str(worker.index), "STREAMFN_WORKERS": str(len(self.workers))}
        # a session of its own: a terminal's Ctrl-C reaches the supervisor only, which drains in order
        worker.proc = subprocess.Popen(self.argv, env=env, stdin=subprocess.DEVNULL, start_new_session=True,
                                       preexec_fn=_die_with_parent)
        worker.started, worker.restart_at = time.monotonic(), None
        log.info("worker started", extra={"worker": worker.index, "pid": worker.proc.pid})

    def _check(self, worker: _Worker) -> None:
        now = time.monotonic()
        if worker.done:
            return
        if worker.proc is None:
            if worker.restart_at is not None and now >= worker.restart_at:
                self._start(worker)
            return
        code = worker.proc.poll()
        if code is None:
            return
        worker.exit_codes.append(code)
        ran_s = now - worker.started
        worker.proc = None
        if code == 0:
            worker.done = True
            log.info("worker finished", extra={"worker": worker.index, "seconds": round(ran_s, 3)})
            return
        if code == USAGE_ERROR:
            log.error("worker rejected its command line; not restarting", extra={"worker": worker.index})
            self._give_up(USAGE_ERROR)
            return
        worker.failures = 1 if ran_s >= self.stable_s else worker.failures + 1
        if worker.failures >= self.max_failures:
            log.error("worker keeps failing; stopping all workers",
                      extra={"worker": worker.index, "exit_code": code, "failures": worker.failures})
            self._give_up(1)
            return
        delay = min(self.backoff_s * 2 ** (worker.failures - 1), self.max_backoff_s)
        worker.restart_at = now + delay
        log.warning("worker failed; restarting after a back-off (its partitions move to the others meanwhile)",
                    extra={"worker": worker.index, "exit_code": code, "backoff_s": delay,
                           "failures": worker.failures})

    def _give_up(self, code: int) -> None:
        self.exit_code = code
        self.stopping = True

    # -- stopping -------------------------------------------------------------------------------
    def stop(self, reason: str) -> None:
        """Ask every worker to drain (SIGTERM); called from the signal handler."""
        if not self.stopping:
            log.info("stopping workers: draining and checkpointing", extra={"reason": reason})
        self.stopping = True
        self._wake.set()

    def _drain(self) -> None:
        live = [w for w in self.workers if w.proc is not None and w.proc.poll() is None]
        for worker in live:
            assert worker.proc is not None
            _signal(worker.proc, signal.SIGTERM)
        deadline = time.monotonic() + self.drain_timeout_s
        for worker in live:
            assert worker.proc is not None
            try:
                code = worker.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker did not drain in time; killing it",
                          extra={"worker": worker.index, "drain_timeout_s": self.drain_timeout_s})
                _signal(worker.proc, signal.SIGKILL)
                code = worker.proc.wait()
            worker.exit_codes.append(code)
            if code != 0 and self.exit_code == 0:
                self.exit_code = 1
            worker.proc = None

    def _install_signal_handlers(self):  # type: ignore[no-untyped-def]
        if threading.current_thread() is not threading.main_thread():
            return lambda: None

        def on_signal(signum: int, frame: FrameType | None) -> None:
            self.stop(f"signal {signal.Signals(signum).name}")

        old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        return lambda: [signal.signal(s, h) for s, h in old.items()]


def _die_with_parent() -> None:
    """In the worker, before exec: get SIGTERM if the supervisor dies, even by SIGKILL (Linux)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _signal(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    try:
        proc.send_signal(sig)
    except ProcessLookupError:  # it exited meanwhile
        pass


def run_workers(argv_for_worker: list[str], workers: int, **options: float) -> int:
    """Run `argv_for_worker` as `workers` supervised processes; return the exit code."""
    options.setdefault("drain_timeout_s", float(os.environ.get("STREAMFN_DRAIN_TIMEOUT_S", "120")))
    return Supervisor(argv_for_worker, workers, **options).run()  # type: ignore[arg-type]
