"""Shared pieces of the table-sink tests: test data with every type, and the kill -9 driver."""
from __future__ import annotations

import datetime as dt
import glob
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from decimal import Decimal

import numpy as np
import polars as pl

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def typed_frame(n: int = 50) -> pl.DataFrame:
    """Rows with the Arrow types the workload and the example use (and a few more)."""
    base = dt.datetime(2024, 3, 1, 12, 0, tzinfo=dt.timezone.utc)
    return pl.DataFrame({
        "id": list(range(n)),
        "symbol": [f"SYM{i % 7:03d}" if i % 11 else None for i in range(n)],
        "price": [10.0 + i * 0.25 for i in range(n)],
        "volume": [i * 100 for i in range(n)],
        "small": pl.Series([i % 100 for i in range(n)], dtype=pl.Int32),
        "flag": [i % 2 == 0 for i in range(n)],
        "at": pl.Series([base + dt.timedelta(milliseconds=i * 1500) for i in range(n)],
                        dtype=pl.Datetime("us", "UTC")),
        "local": pl.Series([dt.datetime(2024, 1, 1) + dt.timedelta(seconds=i) for i in range(n)],
                           dtype=pl.Datetime("us")),
        "day": [dt.date(2024, 1, 1) + dt.timedelta(days=i) for i in range(n)],
        "amount": pl.Series([Decimal(i) / 8 for i in range(n)], dtype=pl.Decimal(18, 4)),
        "tags": [[f"t{i}", "x"] if i % 3 else [] for i in range(n)],
        "ids": [[i, i + 1] for i in range(n)],
    })


def ticks_file(path: str, n: int, seed: int = 7) -> str:
    """An NDJSON file of reference-workload ticks (volume 0 for about 5%)."""
    rng = np.random.default_rng(seed)
    df = pl.DataFrame({
        "symbol": [f"SYM{s:03d}" for s in rng.integers(0, 500, n)],
        "ts": 1_700_000_000_000 + np.arange(n, dtype=np.int64) // 100,
        "price": np.round(rng.uniform(10, 1000, n), 4),
        "volume": np.where(rng.random(n) < 0.05, 0, rng.integers(1, 20_000, n)),
    })
    df.write_ndjson(path)
    return path


def _read_int(path: str) -> int:
    with open(path, encoding="utf-8") as fh:
        return int(fh.read() or 0)


def run_killed_then_restarted(target: str, input_path: str, tmp: str, options: dict,
                              kill_after_batches: int = 8, env: dict | None = None,
                              after_kill: Callable[[], None] | None = None) -> None:
    """Run the job, kill -9 it after some batches, then run it again to the end."""
    progress = os.path.join(tmp, "progress")
    first = dict(options, _delay_s=0.05, _run_dir=os.path.join(tmp, "run"))
    args = [sys.executable, "-m", "tests.connectors._tables_job", target, input_path, progress]
    child_env = dict(os.environ, **(env or {}))
    child = subprocess.Popen([*args, json.dumps(first)], cwd=ROOT, env=child_env)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and child.poll() is None:
            if os.path.exists(progress) and _read_int(progress) >= kill_after_batches:
                break
            time.sleep(0.02)
        assert child.poll() is None, "the job ended before it could be killed; give it more input"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(timeout=30)
    if after_kill is not None:
        after_kill()
    second = dict(options, _delay_s=0.0, _run_dir=os.path.join(tmp, "run"))
    subprocess.run([*args, json.dumps(second)], cwd=ROOT, env=child_env, check=True, timeout=300)
    letters = glob.glob(os.path.join(tmp, "run", "dead_letters", "*"))
    assert not letters, f"the job wrote dead letters: {letters}"


def sort_frame(df: pl.DataFrame, cols: list[str]) -> pl.DataFrame:
    """Rows in a fixed order and columns in the given order, to compare tables."""
    return df.select(cols).sort(cols)


def produce_ticks(bootstrap: str, topic: str, source_path: str, partitions: int = 2) -> None:
    """Write the ticks of an NDJSON file to a new topic, keyed by symbol."""
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1,
                                  config={"retention.ms": "-1", "retention.bytes": "-1"})])[topic].result(10)
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20})
    with open(source_path, "rb") as fh:
        for line in fh:
            producer.produce(topic, line.rstrip(b"\n"), key=json.loads(line)["symbol"].encode())
            producer.poll(0)
    assert producer.flush(30) == 0


class FlakyProxy:
    """A TCP proxy to a loopback port, in its own process: down() kills it, up() restarts it."""

    def __init__(self, target_port: int) -> None:
        import socket

        self.target_port = target_port
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = int(probe.getsockname()[1])
        self._proc: subprocess.Popen | None = None
        self.up()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self) -> None:
        """Start forwarding (again)."""
        self._proc = subprocess.Popen([sys.executable, "-m", "tests.connectors._proxy", str(self.port),
                                       str(self.target_port)], cwd=ROOT, stdout=subprocess.PIPE)
        assert self._proc.stdout is not None and self._proc.stdout.readline().strip() == b"ready"

    def down(self) -> None:
        """Cut every connection and refuse new ones."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc.stdout.close()
            self._proc = None
