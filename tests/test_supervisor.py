"""The --workers supervisor with small worker programs: start N, restart a failed one with back-off,
give up on one that keeps failing, and drain every worker on SIGTERM."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from streamfn.supervisor import run_workers

FAST = {"backoff_s": 0.05, "max_backoff_s": 0.2, "drain_timeout_s": 20.0, "poll_s": 0.02}


def worker(tmp_path: Path, body: str) -> list[str]:
    script = tmp_path / "worker.py"
    script.write_text("import os, sys, signal, time\nfrom pathlib import Path\n"
                      f"OUT = Path({str(tmp_path)!r})\nME = os.environ['STREAMFN_WORKER_ID']\n"
                      + textwrap.dedent(body))
    return [sys.executable, str(script)]


def test_n_workers_run_with_their_ids(tmp_path: Path) -> None:
    argv = worker(tmp_path, "(OUT / f'ran-{ME}-of-{os.environ[\"STREAMFN_WORKERS\"]}').touch()\n")
    assert run_workers(argv, 3, **FAST) == 0
    assert sorted(p.name for p in tmp_path.glob("ran-*")) == ["ran-0-of-3", "ran-1-of-3", "ran-2-of-3"]


def test_a_failed_worker_is_restarted(tmp_path: Path, caplog) -> None:
    argv = worker(tmp_path, """
        marker = OUT / f"tries-{ME}"
        tries = int(marker.read_text()) + 1 if marker.exists() else 1
        marker.write_text(str(tries))
        sys.exit(0 if ME != "1" or tries >= 3 else 7)   # worker 1 fails twice
    """)
    assert run_workers(argv, 2, **FAST) == 0
    assert (tmp_path / "tries-0").read_text() == "1" and (tmp_path / "tries-1").read_text() == "3"
    restarts = [r for r in caplog.records if r.getMessage().startswith("worker failed; restarting")]
    assert [(r.worker, r.exit_code) for r in restarts] == [(1, 7), (1, 7)]
    assert restarts[1].backoff_s == 2 * restarts[0].backoff_s  # the back-off doubles


def test_a_worker_that_keeps_failing_stops_everyone(tmp_path: Path) -> None:
    argv = worker(tmp_path, """
        if ME == "0":
            sys.exit(3)
        signal.signal(signal.SIGTERM, lambda *a: ((OUT / "drained-1").touch(), sys.exit(0)))
        time.sleep(60)
    """)
    started = time.monotonic()
    assert run_workers(argv, 2, max_failures=3, **FAST) == 1
    assert (tmp_path / "drained-1").exists() and time.monotonic() - started < 30


def test_a_usage_error_is_not_retried(tmp_path: Path) -> None:
    argv = worker(tmp_path, "(OUT / f'try-{ME}-{time.time_ns()}').touch()\nsys.exit(2)\n")
    assert run_workers(argv, 1, **FAST) == 2
    assert len(list(tmp_path.glob("try-*"))) == 1


def test_sigterm_drains_every_worker(tmp_path: Path) -> None:
    body = """
        def drain(*_):
            time.sleep(0.3)  # a final checkpoint takes a moment
            (OUT / f"drained-{ME}").touch()
            sys.exit(0)
        signal.signal(signal.SIGTERM, drain)
        (OUT / f"up-{ME}").touch()
        while True:
            time.sleep(0.05)
    """
    argv = worker(tmp_path, body)
    code = ("import sys; from streamfn.supervisor import run_workers\n"
            f"sys.exit(run_workers({argv!r}, 3, backoff_s=0.05, poll_s=0.02, drain_timeout_s=20))\n")
    sup = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 30
        while len(list(tmp_path.glob("up-*"))) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        sup.send_signal(signal.SIGTERM)
        assert sup.wait(30) == 0
    finally:
        if sup.poll() is None:
            sup.kill()
            sup.wait()
    assert sorted(p.name for p in tmp_path.glob("drained-*")) == ["drained-0", "drained-1", "drained-2"]


def test_a_worker_that_ignores_sigterm_is_killed_after_the_drain_timeout(tmp_path: Path) -> None:
    argv = worker(tmp_path, """
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        (OUT / "up").touch()
        time.sleep(60)
    """)
    code = ("import sys; from streamfn.supervisor import run_workers\n"
            f"sys.exit(run_workers({argv!r}, 1, poll_s=0.02, drain_timeout_s=0.5))\n")
    sup = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "up").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(sup.pid, signal.SIGTERM)
        assert sup.wait(30) == 1
    finally:
        if sup.poll() is None:
            sup.kill()
            sup.wait()
