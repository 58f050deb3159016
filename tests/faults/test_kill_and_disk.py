"""Faults on the worker's own machine: kill -9 of the worker, and a full disk under its checkpoints.

The job recovers by itself: the Supervisor restarts a dead or failed worker after a back-off, and
the worker resumes from its last checkpoint. The output is then checked record by record.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import time

import polars as pl
import pytest

from tests.faults.harness import FaultReport, SupervisedJob, account, schedule
from tests.stateful.test_crash import direct, write_ticks

pytestmark = pytest.mark.integration


def job_argv(tmp: str, checkpoint: str, sleep_s: float, settings: dict[str, str] | None = None) -> list[str]:
    return [sys.executable, "-m", "tests.faults.job", os.path.join(tmp, "in", "*.jsonl"), os.path.join(tmp, "out"),
            checkpoint, os.path.join(tmp, "run"), json.dumps(settings or {}), str(sleep_s)]


def test_kill_9_at_seeded_points(tmp_path):
    tmp, rng, report = str(tmp_path), schedule("kill"), FaultReport("kill -9 worker")
    df = write_ticks(os.path.join(tmp, "in"), n=100_000)
    with SupervisedJob(job_argv(tmp, os.path.join(tmp, "checkpoints"), 0.03), os.path.join(tmp, "job.log")) as job:
        for _ in range(3):
            if job.wait_running() and not time.sleep(rng.uniform(0.2, 1.5)) and job.kill_worker():
                report.fault("kill -9")
        assert job.wait(180) == 0, job.tail()
        report.worker_restarts = job.restarts
    report.recovered = report.faults_injected
    assert report.faults_injected >= 2, "the job ended before the faults: give it more input"
    assert report.worker_restarts >= report.faults_injected
    account(report, pl.read_parquet(os.path.join(tmp, "out", "*.parquet")), direct(df), df)


def _mount_tmpfs(path: str, size: str) -> bool:
    os.makedirs(path, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None or os.environ.get("STREAMFN_FAULT_NO_MOUNT"):
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path],
                          capture_output=True).returncode == 0


def _fill(path: str) -> str:
    """Fill the file system under `path` to the last byte; the filler's path."""
    filler = os.path.join(path, "filler")
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    return filler


def test_disk_full_under_the_checkpoints(tmp_path):
    """The checkpoint directory is a 4 MiB tmpfs, filled at seeded points, freed a while later.

    Without root (no mount), the fallback is a file-size limit on the worker (RLIMIT_FSIZE, set
    on the running worker and on the ones started while the fault lasts): every write past a few
    bytes then fails with EFBIG, an OSError like ENOSPC, which is what the checkpoint code sees.
    STREAMFN_FAULT_NO_MOUNT=1 forces the fallback.
    """
    tmp, rng, report = str(tmp_path), schedule("disk"), FaultReport("disk full")
    df = write_ticks(os.path.join(tmp, "in"), n=100_000)
    disk = os.path.join(tmp, "disk")
    mounted = _mount_tmpfs(disk, "4m")
    try:
        argv = job_argv(tmp, os.path.join(disk, "checkpoints"), 0.05)
        with SupervisedJob(argv, os.path.join(tmp, "job.log"), max_failures=12) as job:
            for _ in range(3):
                if not job.wait_running():
                    break
                time.sleep(rng.uniform(0.2, 1.5))
                if mounted:
                    filler = _fill(disk)
                else:
                    os.environ["STREAMFN_FAULT_FSIZE"] = "64"
                    worker = job.worker()
                    if worker is not None:
                        resource.prlimit(worker.pid, resource.RLIMIT_FSIZE, (64, 64))
                report.fault("disk full" if mounted else "file-size limit")
                time.sleep(rng.uniform(0.5, 2.0))
                if mounted:
                    os.remove(filler)
                else:
                    os.environ.pop("STREAMFN_FAULT_FSIZE", None)
            assert job.wait(180) == 0, job.tail()
            report.worker_restarts = job.restarts
        report.recovered = report.faults_injected
        assert report.faults_injected >= 2, "the job ended before the faults: give it more input"
        with open(os.path.join(tmp, "job.log"), errors="replace") as f:
            assert "No space left" in f.read() or not mounted  # the failure said what it was
    finally:
        os.environ.pop("STREAMFN_FAULT_FSIZE", None)
        if mounted:
            subprocess.run(["umount", "-l", disk], check=False)
    account(report, pl.read_parquet(os.path.join(tmp, "out", "*.parquet")), direct(df), df)
