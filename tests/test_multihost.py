"""Workers on separate hosts: two `streamfn run` processes, each in its own network namespace (a test
host made here with `ip netns`, a bridge and veth pairs, on a private /24 that exists only inside
this machine), against one Tansu broker and one moto S3 checkpoint store listening on the bridge.
One worker is killed; the survivor takes over its partitions, restores their state from S3, and
finishes with every input counted exactly once.

Where `ip netns` is not allowed (not root), the two workers run as plain processes on 127.0.0.1 with
different client ids: the same test, without the network separation (the log line says which).
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3
import polars as pl
import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from streamfn.connectors.kafka.broker import tansu_binary

pytestmark = pytest.mark.integration
log = logging.getLogger("tests.multihost")
JOB = Path(__file__).parent / "data" / "multihost_job.py"
SYMBOLS = [f"S{i:02d}" for i in range(20)]


@dataclass
class Hosts:
    """Where the services listen, and how to run a command on test host 0 or 1."""

    service_ip: str
    prefixes: list[list[str]]
    isolated: bool


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def _netns_hosts(tag: str) -> Iterator[Hosts]:
    net = f"10.251.{random.randint(1, 254)}"
    bridge, made = f"sfb{tag}", []
    try:
        _ip("link", "add", bridge, "type", "bridge")
        made.append(("link", bridge))
        _ip("addr", "add", f"{net}.1/24", "dev", bridge)
        _ip("link", "set", bridge, "up")
        prefixes = []
        for i in range(2):
            ns, host_end, ns_end = f"sfn{tag}{i}", f"sfh{tag}{i}", f"sfp{tag}{i}"
            _ip("netns", "add", ns)
            made.append(("netns", ns))
            _ip("link", "add", host_end, "type", "veth", "peer", "name", ns_end)
            _ip("link", "set", ns_end, "netns", ns)
            _ip("link", "set", host_end, "master", bridge)
            _ip("link", "set", host_end, "up")
            for cmd in (["addr", "add", f"{net}.{i + 2}/24", "dev", ns_end], ["link", "set", ns_end, "up"],
                        ["link", "set", "lo", "up"]):
                _ip("netns", "exec", ns, "ip", *cmd)
            prefixes.append(["ip", "netns", "exec", ns])
        yield Hosts(f"{net}.1", prefixes, True)
    finally:
        for kind, name in reversed(made):  # deleting a namespace removes its veth pair too
            subprocess.run(["ip", kind, "del", name], capture_output=True, timeout=10)


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    """Two test hosts in their own network namespaces, or two local processes where that is not allowed."""
    tag = uuid.uuid4().hex[:6]
    usable = os.geteuid() == 0 and shutil.which("ip") is not None and subprocess.run(
        ["ip", "netns", "add", f"sfq{tag}"], capture_output=True).returncode == 0
    if usable:
        subprocess.run(["ip", "netns", "del", f"sfq{tag}"], capture_output=True)
        yield from _netns_hosts(tag)
    else:
        log.warning("ip netns is not available: the workers run as local processes")
        yield Hosts("127.0.0.1", [[], []], False)


def _wait_port(ip: str, port: int, proc: subprocess.Popen | None = None, timeout_s: float = 30) -> None:
    import socket
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the server on {ip}:{port} exited with {proc.returncode}")
        try:
            with socket.create_connection((ip, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listened on {ip}:{port} within {timeout_s}s")


def _free_port(ip: str) -> int:
    import socket
    with socket.socket() as s:
        s.bind((ip, 0))
        return int(s.getsockname()[1])


@pytest.fixture
def services(hosts: Hosts, tmp_path: Path) -> Iterator[dict[str, str]]:
    """A Tansu broker and a moto S3 server on the service address; stopped by PID / handle."""
    from moto.server import ThreadedMotoServer

    ip = hosts.service_ip
    kport, sport = _free_port(ip), _free_port(ip)
    url = f"tcp://{ip}:{kport}"
    with open(tmp_path / "tansu.log", "wb") as out:
        broker = subprocess.Popen([str(tansu_binary()), "broker", "--listener-url", url,
                                   "--advertised-listener-url", url], stdout=out, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, start_new_session=True)
    s3 = ThreadedMotoServer(ip_address=ip, port=sport, verbose=False)
    s3.start()
    try:
        _wait_port(ip, kport, broker)
        endpoint = f"http://{ip}:{sport}"
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                     aws_secret_access_key="testing").create_bucket(Bucket="ckpt")
        yield {"brokers": f"{ip}:{kport}", "s3": endpoint}
    finally:
        s3.stop()
        broker.terminate()
        try:
            broker.wait(10)
        except subprocess.TimeoutExpired:
            broker.kill()
            broker.wait()


def _produce(brokers: str, topic: str, start: int, n: int) -> None:
    producer = Producer({"bootstrap.servers": brokers, "linger.ms": 5})
    for i in range(start, start + n):
        symbol = SYMBOLS[i % len(SYMBOLS)]
        producer.produce(topic, json.dumps({"symbol": symbol, "volume": i % 7}).encode(), symbol)
        if i % 1000 == 0:
            producer.poll(0)
    assert producer.flush(30) == 0


def _expected(n: int) -> dict[str, tuple[int, int]]:
    frame = pl.DataFrame({"i": range(n)}).with_columns(
        pl.col("i").map_elements(lambda i: SYMBOLS[i % len(SYMBOLS)], return_dtype=pl.String).alias("symbol"),
        (pl.col("i") % 7).alias("volume"))
    agg = frame.group_by("symbol").agg(pl.len().cast(pl.Int64).alias("n"), pl.col("volume").sum())
    return {s: (n_, v) for s, n_, v in agg.iter_rows()}


def _latest(out: Path) -> pl.DataFrame:
    files = sorted(out.glob("**/*.jsonl"))
    if not files:
        return pl.DataFrame(schema={"symbol": pl.String, "n": pl.Int64, "volume": pl.Int64})
    rows = pl.concat([pl.read_ndjson(f, schema={"symbol": pl.String, "n": pl.Int64, "volume": pl.Int64})
                      for f in files])
    return rows.group_by("symbol").agg(pl.col("n").max(), pl.col("volume").max())


def _wait(what: str, check, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_the_survivor_finishes_the_work_with_state_intact(hosts: Hosts, services: dict[str, str],
                                                           tmp_path: Path) -> None:
    topic, group = f"mh-{uuid.uuid4().hex[:8]}", f"g-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": services["brokers"]})
    admin.create_topics([NewTopic(topic, num_partitions=4, replication_factor=1)])[topic].result(30)
    _produce(services["brokers"], topic, 0, 4000)
    outs = [tmp_path / "out-0", tmp_path / "out-1"]
    procs = []
    for i in range(2):
        env = {**os.environ, "TOPIC": topic, "CKPT": "s3://ckpt/multihost", "OUT_DIR": str(outs[i]),
               "RUN_DIR": str(tmp_path / f"run-{i}"), "STREAMFN_WORKER_ID": str(i)}
        cmd = hosts.prefixes[i] + [
            sys.executable, "-m", "streamfn.cli", "run", str(JOB), "--brokers", services["brokers"],
            "--group", group, "--quiet", "--log-format", "text", "--set", f"kafka.client.id=host-{i}",
            "--set", "kafka.session.timeout.ms=1000", "--set", "kafka.heartbeat.interval.ms=200",
            "--set", f"checkpoint.storage.endpoint_url={services['s3']}",
            "--set", "checkpoint.storage.key=testing", "--set", "checkpoint.storage.secret=testing"]
        with open(tmp_path / f"worker-{i}.log", "wb") as err:
            procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err,
                                          cwd=Path(__file__).resolve().parents[1]))
    try:
        first = _expected(4000)
        _wait("both hosts to count the first 4000 records",
              lambda: dict(zip(*(pl.concat([_latest(o) for o in outs]).group_by("symbol").agg(pl.col("n").max())
                                 .to_dict(as_series=False).values()))) == {s: c for s, (c, _) in first.items()})
        assert _latest(outs[0]).height and _latest(outs[1]).height, "the group did not split the partitions"
        _produce(services["brokers"], topic, 4000, 4000)
        time.sleep(0.1)
        procs[1].kill()  # host 1 dies mid-stream: no revoke, no last checkpoint
        procs[1].wait(10)
        total = _expected(8000)
        _wait("the survivor to count all 8000 records",
              lambda: {s: (n, v) for s, n, v in pl.concat([_latest(o) for o in outs]).group_by("symbol")
                       .agg(pl.col("n").max(), pl.col("volume").max()).iter_rows()} == total)
        procs[0].send_signal(signal.SIGTERM)
        assert procs[0].wait(60) == 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    got = pl.concat([_latest(o) for o in outs])
    for symbol, n, _ in got.iter_rows():  # nothing counted twice, on either host
        assert n <= total[symbol][0], f"{symbol} counted {n} times, sent {total[symbol][0]}"
    survivor = _latest(outs[0])
    assert {s: (n, v) for s, n, v in survivor.iter_rows()} == total, "the survivor holds every key's full state"
    log.info("multi-host test ran", extra={"isolated_hosts": hosts.isolated})
