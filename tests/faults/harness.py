"""What every fault test shares: a supervised job, a seeded schedule, and the final accounting.

The job runs under `streamfn.supervisor.Supervisor` (what `streamfn run --workers N` uses), on a
thread of the test process: a worker that dies or fails is restarted after a back-off, with no
help from the test. The test only breaks things (by PID) and, at the end, checks the output
against a direct polars computation.

STREAMFN_FAULT_SEED picks another schedule (default 9); STREAMFN_FAULT_REPORT names a JSON-lines
file each test appends its figures to (they are printed too: `pytest -s`).
"""
from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import polars as pl

from streamfn.supervisor import Supervisor
from tests.stateful.test_crash import ROOT, published

log = logging.getLogger("tests.faults")

SEED = int(os.environ.get("STREAMFN_FAULT_SEED", "9"))


def schedule(name: str) -> random.Random:
    """The seeded random source of one test's fault points (the seed and the test name fix it)."""
    return random.Random(f"{SEED}:{name}")


@dataclass
class FaultReport:
    """The figures a fault test reports: what was broken, what came back, what was checked."""

    test: str
    seed: int = SEED
    faults_injected: int = 0
    recovered: int = 0
    worker_restarts: int = 0
    records_checked: int = 0
    dead_letters: int = 0
    lost: int = 0
    windows: int = 0
    windows_reemitted: int = 0  # identical copies a file sink published twice across a crash
    faults: list[str] = field(default_factory=list)

    def fault(self, what: str) -> None:
        """Note one injected fault."""
        self.faults_injected += 1
        self.faults.append(what)

    def publish(self) -> None:
        """Print the figures and append them to $STREAMFN_FAULT_REPORT."""
        line = json.dumps(asdict(self))
        print(f"\nFAULT REPORT {line}")
        target = os.environ.get("STREAMFN_FAULT_REPORT")
        if target:
            with open(target, "a") as f:
                f.write(line + "\n")


class SupervisedJob:
    """A job command line run under the Supervisor on a thread; its worker can be killed by PID."""

    def __init__(self, argv: list[str], log_path: str, *, env: dict[str, str] | None = None,
                 max_failures: int = 8, workers: int = 1) -> None:
        self.log_path = log_path
        wrapped = [sys.executable, "-m", "tests.faults.worker", log_path, *argv]
        self.supervisor = Supervisor(wrapped, workers, backoff_s=0.2, max_backoff_s=2.0, stable_s=30.0,
                                     max_failures=max_failures, drain_timeout_s=30.0, poll_s=0.05)
        self.exit_code: int | None = None
        self._lanes_seen = 0
        self._running_pid: int | None = None
        self._env = env or {}
        self._thread = threading.Thread(target=self._run, name="fault-supervisor", daemon=True)

    def _run(self) -> None:
        old = {k: os.environ.get(k) for k in self._env}
        os.environ.update(self._env)  # the Supervisor passes the test's environment on
        try:
            self.exit_code = self.supervisor.run()
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def __enter__(self) -> SupervisedJob:
        os.chdir(ROOT)  # workers import tests.* from the repository root
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread.is_alive():  # a failed check: stop the worker so none outlives the test
            self.supervisor.stop("test ended")
            self._thread.join(60)

    def wait_running(self, lanes: int = 2, timeout_s: float = 60) -> bool:
        """Wait until the running worker has opened its lanes; False if the job ended first."""
        current = self.worker()
        if current is not None and current.pid == self._running_pid:
            return True  # the same worker as last time: it has its lanes
        deadline = time.monotonic() + timeout_s
        while self.tail(10**9).count("lane opened") < self._lanes_seen + lanes:
            assert time.monotonic() < deadline, f"no worker opened its lanes in {timeout_s:g}s:\n{self.tail()}"
            if not self._thread.is_alive():
                return False
            time.sleep(0.02)
        self._lanes_seen = self.tail(10**9).count("lane opened")
        current = self.worker()
        self._running_pid = current.pid if current is not None else None
        return current is not None

    def worker(self, index: int = 0) -> subprocess.Popen[bytes] | None:
        """The running worker process, if one runs now."""
        proc = self.supervisor.workers[index].proc
        return proc if proc is not None and proc.poll() is None else None

    def kill_worker(self, index: int = 0) -> bool:
        """kill -9 the running worker; False when none was running."""
        proc = self.worker(index)
        if proc is None:
            return False
        os.kill(proc.pid, signal.SIGKILL)
        return True

    @property
    def restarts(self) -> int:
        """Workers that died or failed (each was restarted, or the supervisor gave up)."""
        return sum(1 for w in self.supervisor.workers for code in w.exit_codes if code != 0)

    def wait(self, timeout_s: float) -> int:
        """Wait for the supervisor to end (every worker done, or given up); its exit code."""
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), f"the job did not finish in {timeout_s:g}s:\n{self.tail()}"
        assert self.exit_code is not None
        return self.exit_code

    def tail(self, n: int = 4000) -> str:
        """The end of the workers' log."""
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-n:]
        except OSError:
            return ""


def outages(job: SupervisedJob, rng: random.Random, report: FaultReport, what: str, down: Callable[[], object],
            up: Callable[[], object], *, times: int, lanes: int = 2, before: tuple[float, float] = (0.2, 1.5),
            hold: tuple[float, float] = (1.0, 4.0)) -> None:
    """Take something the job needs down `times` times at seeded moments while it runs; bring it back."""
    for _ in range(times):
        if not job.wait_running(lanes=lanes):
            break
        time.sleep(rng.uniform(*before))
        down()
        report.fault(what)
        time.sleep(rng.uniform(*hold))
        up()


def wait_for_output(out_tmp: str, more_than: int, job: SupervisedJob, timeout_s: float = 60) -> bool:
    """Wait until the job has published more than `more_than` output files; False if it ended first."""
    deadline = time.monotonic() + timeout_s
    while published(out_tmp) <= more_than:
        assert time.monotonic() < deadline, f"no output progress in {timeout_s:g}s:\n{job.tail()}"
        if not job._thread.is_alive():
            return False
        time.sleep(0.02)
    return True


def account(report: FaultReport, got: pl.DataFrame, want: pl.DataFrame, inputs: pl.DataFrame,
            dead_letters: int = 0) -> None:
    """Check the output against the direct computation and fill in the report's figures.

    Every input record is in some window's count (or a dead letter); every window is there
    with its exact values (state counted each record once); a window published twice across a
    crash (the file sink is at-least-once) is an identical copy, never a second value.
    """
    keys = ["symbol", "window_start"]
    # a window re-emitted after a restore may differ in vwap's last bits: the sum runs over other
    # batch boundaries. Same count and volume and vwap within 1e-9 is the same window.
    spread = got.group_by(keys).agg(pl.col("count").n_unique().alias("counts"),
                                    pl.col("volume").n_unique().alias("volumes"),
                                    (pl.col("vwap").max() - pl.col("vwap").min()).alias("vwap_spread"),
                                    pl.col("vwap").max().abs().alias("vwap_abs"))
    twice = spread.filter((pl.col("counts") > 1) | (pl.col("volumes") > 1)
                          | (pl.col("vwap_spread") > 1e-9 * pl.col("vwap_abs")))
    assert twice.height == 0, f"windows published with two different values:\n{twice}"
    distinct = got.unique(subset=keys, keep="first")
    joined = distinct.join(want, on=keys, how="full", suffix="_want", coalesce=True)
    wrong = joined.filter(pl.col("count").is_null() | pl.col("count_want").is_null()
                          | (pl.col("count") != pl.col("count_want")) | (pl.col("volume") != pl.col("volume_want"))
                          | ((pl.col("vwap") - pl.col("vwap_want")).abs() > 1e-9 * pl.col("vwap_want").abs()))
    counted = int(distinct["count"].sum())
    traded = inputs.filter(pl.col("volume") > 0).height
    report.records_checked = inputs.height
    report.dead_letters = dead_letters
    report.windows = distinct.height
    report.windows_reemitted = got.height - distinct.height
    report.lost = traded - counted - dead_letters
    report.publish()
    assert wrong.height == 0, wrong
    assert counted + dead_letters == traded, f"{traded} traded records, {counted} in windows, {dead_letters} dead"
    assert report.lost == 0
