"""kill -9 a process running a windowed pipeline with checkpoints, restart it, check every window."""
from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import polars as pl
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def ticks_frame(n: int, seed: int) -> pl.DataFrame:
    """n reference ticks of 20 symbols in event-time order (1 in 20 with no volume)."""
    rng = np.random.default_rng(seed)
    return pl.DataFrame({
        "symbol": [f"SYM{i:02d}" for i in rng.integers(0, 20, n)],
        "ts": 1_700_000_000_000 + np.arange(n, dtype=np.int64) // 10,
        "price": np.round(rng.uniform(10, 1000, n), 4),
        "volume": np.where(rng.random(n) < 0.05, 0, rng.integers(1, 20000, n)),
    })


def write_ticks(folder: str, n: int = 60_000, files: int = 2) -> pl.DataFrame:
    """Ticks in event-time order, split into files by symbol (each file is a partition)."""
    df = ticks_frame(n, seed=11)
    part = df.with_columns((pl.col("symbol").str.slice(3).cast(pl.Int64) % files).alias("f"))
    os.makedirs(folder, exist_ok=True)
    for i in range(files):
        part.filter(pl.col("f") == i).drop("f").write_ndjson(os.path.join(folder, f"ticks-{i}.jsonl"))
    return df


def direct(df: pl.DataFrame) -> pl.DataFrame:
    """The answer, straight from polars."""
    return (df.filter(pl.col("volume") > 0)
            .group_by("symbol", (pl.col("ts") // 1000 * 1000).alias("window_start"))
            .agg(pl.len().cast(pl.Int64).alias("count"), pl.col("volume").sum().alias("volume"),
                 ((pl.col("price") * pl.col("volume")).sum() / pl.col("volume").sum()).alias("vwap")))


def start(tmp: str, checkpoint: str, settings: dict[str, str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "tests.stateful.crash_job", os.path.join(tmp, "in", "*.jsonl"),
           os.path.join(tmp, "out"), checkpoint, os.path.join(tmp, "run"), json.dumps(settings)]
    log = open(os.path.join(tmp, "job.log"), "ab")
    try:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    finally:
        log.close()


def published(tmp: str) -> int:
    return len(glob.glob(os.path.join(tmp, "out", "*.parquet")))


def kill_and_restart(start_job, tmp: str, kills: int, timeout_s: float = 120) -> None:
    """Start the job, kill -9 it `kills` times once it has published more output, then let it finish.

    Every process started here is waited for, and killed if a check fails, so none outlives the test.
    """
    procs: list[subprocess.Popen] = []
    try:
        killed = 0
        for _ in range(kills):
            seen = published(tmp)
            proc = start_job()
            procs.append(proc)
            deadline = time.monotonic() + 60
            while published(tmp) <= seen + 1 and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
            killed += proc.wait() == -signal.SIGKILL
        assert killed == kills, "the job ended before it could be killed: give it more input"
        proc = start_job()
        procs.append(proc)
        with open(os.path.join(tmp, "job.log"), errors="replace") as f:
            assert proc.wait(timeout=timeout_s) == 0, f.read()[-3000:]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def crash_and_recover(tmp: str, checkpoint: str, settings: dict[str, str], kills: int) -> pl.DataFrame:
    """Kill and restart the file job; return everything it published."""
    kill_and_restart(lambda: start(tmp, checkpoint, settings), tmp, kills)
    return pl.read_parquet(os.path.join(tmp, "out", "*.parquet"))


def check(got: pl.DataFrame, want: pl.DataFrame) -> None:
    """Every window is in the output with its exact values: none lost, none counted twice.

    The file sink is at-least-once: it publishes at flush, just before the manifest, so a kill
    between the two re-emits a window after the restart, with the same values.
    """
    joined = got.join(want, on=["symbol", "window_start"], how="left", suffix="_want")
    wrong = joined.filter(pl.col("count_want").is_null() | (pl.col("count") != pl.col("count_want"))
                          | (pl.col("volume") != pl.col("volume_want"))
                          | ((pl.col("vwap") - pl.col("vwap_want")).abs() > 1e-9 * pl.col("vwap_want").abs()))
    assert wrong.height == 0, wrong
    lost = want.join(got, on=["symbol", "window_start"], how="anti")
    assert lost.height == 0, lost


@pytest.mark.integration
def test_kill_9_and_restart_with_local_checkpoints(tmp_path):
    tmp = str(tmp_path)
    df = write_ticks(os.path.join(tmp, "in"))
    got = crash_and_recover(tmp, os.path.join(tmp, "checkpoints"), {}, kills=3)
    check(got, direct(df))


@pytest.mark.integration
def test_kill_9_and_restart_with_checkpoints_on_s3(tmp_path, s3_bucket):
    tmp = str(tmp_path)
    df = write_ticks(os.path.join(tmp, "in"))
    got = crash_and_recover(tmp, s3_bucket.url("crash/checkpoints"), s3_bucket.settings(), kills=2)
    check(got, direct(df))
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3_bucket.endpoint, key="testing", secret="testing")
    assert fs.ls(f"{s3_bucket.name}/crash/checkpoints/ticks")
