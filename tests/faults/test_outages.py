"""Faults in the servers a job depends on: the checkpoint store goes away, the broker restarts.

- S3: a moto server runs as its own process; the job reaches it through a TCP forwarder (its own
  process too). Killing the forwarder makes the store unreachable (connections cut, new ones
  refused) while moto keeps its data; starting the forwarder again on the same port brings it
  back. (Restarting moto itself would lose its in-memory buckets, which tests nothing useful.)
- Broker: noida-db keeps its log on disk (--data-dir), so a stop and a start on the same port is
  a real broker restart: the topic and the group's committed offsets survive it.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import polars as pl
import pytest
from streamfn.connectors.kafka.broker import free_port, stop_process, wait_listening

from tests.faults.harness import FaultReport, SupervisedJob, account, outages, schedule
from tests.faults.test_kill_and_disk import job_argv
from tests.servers.kafka import _noida_binary
from tests.stateful.test_crash import ROOT, direct, write_ticks
from tests.stateful.test_kafka_crash import produce

pytestmark = pytest.mark.integration


class Process:
    """A server process started here, stopped by its PID."""

    def __init__(self, argv: list[str], port: int, log_path: str, what: str) -> None:
        self.argv, self.port, self.log_path, self.what = argv, port, log_path, what
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(self.argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        wait_listening(self.port, self.proc, self.what, 30.0)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)


@pytest.fixture
def s3_behind_a_forwarder(tmp_path) -> Iterator[tuple[str, str, Process]]:
    """(endpoint URL through the forwarder, bucket, the forwarder) for a moto server of this test."""
    import boto3

    moto_port, proxy_port = free_port(), free_port()
    moto = Process([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(moto_port)], moto_port,
                   str(tmp_path / "moto.log"), "moto_server")
    proxy = Process([sys.executable, "-m", "tests.connectors._proxy", str(proxy_port), str(moto_port)],
                    proxy_port, str(tmp_path / "proxy.log"), "forwarder")
    moto.start()
    try:
        proxy.start()
        s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{moto_port}", region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
        s3.create_bucket(Bucket="faults")
        s3.close()
        yield f"http://127.0.0.1:{proxy_port}", "faults", proxy
    finally:
        proxy.stop()
        moto.stop()


def test_checkpoint_store_unreachable_for_a_while(tmp_path, s3_behind_a_forwarder):
    endpoint, bucket, forwarder = s3_behind_a_forwarder
    tmp, rng, report = str(tmp_path), schedule("s3"), FaultReport("checkpoint store unreachable")
    df = write_ticks(os.path.join(tmp, "in"), n=100_000)
    settings = {"checkpoint.storage.endpoint_url": endpoint, "checkpoint.storage.key": "testing",
                "checkpoint.storage.secret": "testing"}
    argv = job_argv(tmp, f"s3://{bucket}/ck", 0.03, settings)
    with SupervisedJob(argv, os.path.join(tmp, "job.log"), max_failures=12) as job:
        outages(job, rng, report, "S3 unreachable", forwarder.kill, forwarder.start, times=3)
        assert job.wait(240) == 0, job.tail()
        report.worker_restarts = job.restarts
    report.recovered = report.faults_injected
    assert report.faults_injected >= 2, "the job ended before the faults: give it more input"
    account(report, pl.read_parquet(os.path.join(tmp, "out", "*.parquet")), direct(df), df)


@pytest.fixture
def noida(tmp_path) -> Iterator[Process]:
    """A noida-db broker of this test, with its data on disk so that it survives a restart."""
    port = free_port()
    broker = Process([str(_noida_binary()), "start", "--only", "kafka", "--host", "127.0.0.1", "--kafka-port",
                      str(port), "--data-dir", str(tmp_path / "noida")], port, str(tmp_path / "noida.log"),
                     "noida-db")
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def ticks_with_sentinels(tmp: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(the ticks checked, the ticks produced): one late tick per symbol closes every real window."""
    df = write_ticks(os.path.join(tmp, "unused"), n=60_000)
    sentinels = (df.group_by("symbol").agg(pl.col("price").first())
                 .with_columns(ts=pl.lit(int(df["ts"].max()) + 5_000), volume=pl.lit(1, pl.Int64))
                 .select(df.columns))
    return df, pl.concat([df, sentinels])


def kafka_argv(tmp: str, bootstrap: str, *mode: str) -> list[str]:
    settings = {"kafka.brokers": bootstrap, "kafka.session.timeout.ms": "6000", "kafka.heartbeat.interval.ms": "1000"}
    return [sys.executable, "-m", "tests.stateful.kafka_job", "ticks", "g-faults", os.path.join(tmp, "out"),
            os.path.join(tmp, "checkpoints"), os.path.join(tmp, "run"), json.dumps(settings), *mode]


def restart_broker(job: SupervisedJob, broker: Process, rng, report: FaultReport, times: int) -> None:
    outages(job, rng, report, "broker stopped", broker.stop, broker.start, times=times, lanes=1,
            before=(0.5, 2.0), hold=(1.0, 3.0))


def test_broker_stops_and_restarts(tmp_path, noida):
    """A following (streaming) job rides out two broker restarts; then every real window is exact."""
    tmp, rng, report = str(tmp_path), schedule("broker"), FaultReport("broker restart (noida-db)")
    df, produced = ticks_with_sentinels(tmp)
    bootstrap = f"127.0.0.1:{noida.port}"
    produce(bootstrap, "ticks", produced.to_dicts())
    want = direct(df)
    out = os.path.join(tmp, "out")
    with SupervisedJob(kafka_argv(tmp, bootstrap, "follow"), os.path.join(tmp, "job.log"),
                       env={"JOB_LOG": "INFO"}, max_failures=12) as job:
        restart_broker(job, noida, rng, report, times=2)
        deadline = time.monotonic() + 120
        while _windows_done(out, want) < want.height:
            assert time.monotonic() < deadline, f"windows missing after the restarts:\n{job.tail()}"
            assert job.worker() is not None or job._thread.is_alive(), job.tail()
            time.sleep(0.2)
        job.supervisor.stop("test: all windows are out")
        assert job.wait(60) == 0, job.tail()
        report.worker_restarts = job.restarts
    report.recovered = report.faults_injected
    got = pl.read_parquet(os.path.join(out, "*.parquet")).filter(pl.col("window_start") <= df["ts"].max())
    account(report, got.select(want.columns), want, df)


def _windows_done(out: str, want: pl.DataFrame) -> int:
    try:
        got = pl.read_parquet(os.path.join(out, "*.parquet"))
    except Exception:  # nothing published yet
        return 0
    return got.select("symbol", "window_start").unique().join(want, on=["symbol", "window_start"]).height


def test_until_idle_run_drains_the_topic_across_a_broker_restart(tmp_path, noida):
    """A broker outage revokes the partitions; an --until-idle run must not take that for the end."""
    tmp, rng, report = str(tmp_path), schedule("broker-idle"), FaultReport("broker restart, --until-idle")
    df, produced = ticks_with_sentinels(tmp)
    bootstrap = f"127.0.0.1:{noida.port}"
    produce(bootstrap, "ticks", produced.to_dicts())
    with SupervisedJob(kafka_argv(tmp, bootstrap), os.path.join(tmp, "job.log"), env={"JOB_LOG": "INFO"},
                       max_failures=12) as job:
        restart_broker(job, noida, rng, report, times=1)
        assert job.wait(120) == 0, job.tail()
        report.worker_restarts = job.restarts
    report.recovered = report.faults_injected
    want = direct(df)
    got = pl.read_parquet(os.path.join(tmp, "out", "*.parquet")).filter(pl.col("window_start") <= df["ts"].max())
    account(report, got.select(want.columns), want, df)
