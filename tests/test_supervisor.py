"""The --workers supervisor with small worker programs: start N, restart a failed one with back-off,
give up on one that keeps failing, and drain every worker on SIGTERM."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from streamfn.supervisor import run_workers

FAST = {"backoff_s": 0.05, "max_backoff_s": 0.2, "drain_timeout_s": 20.0, "poll_s": 0.02}


@contextmanager
def _started(cmd: list[str], **popen: Any) -> Iterator[subprocess.Popen]:
    """A process for the test, killed on the way out if the test left it running."""
    proc = subprocess.Popen(cmd, **popen)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


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
    with _started([sys.executable, "-c", code]) as sup:
        deadline = time.monotonic() + 30
        while len(list(tmp_path.glob("up-*"))) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        sup.send_signal(signal.SIGTERM)
        assert sup.wait(30) == 0
    assert sorted(p.name for p in tmp_path.glob("drained-*")) == ["drained-0", "drained-1", "drained-2"]


def test_a_worker_that_ignores_sigterm_is_killed_after_the_drain_timeout(tmp_path: Path) -> None:
    argv = worker(tmp_path, """
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        (OUT / "up").touch()
        time.sleep(60)
    """)
    code = ("import sys; from streamfn.supervisor import run_workers\n"
            f"sys.exit(run_workers({argv!r}, 1, poll_s=0.02, drain_timeout_s=0.5))\n")
    with _started([sys.executable, "-c", code]) as sup:
        deadline = time.monotonic() + 30
        while not (tmp_path / "up").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(sup.pid, signal.SIGTERM)
        assert sup.wait(30) == 1


def test_workers_get_sigterm_when_the_supervisor_is_killed(tmp_path: Path) -> None:
    argv = worker(tmp_path, """
        signal.signal(signal.SIGTERM, lambda *a: ((OUT / f"drained-{ME}").touch(), sys.exit(0)))
        (OUT / f"up-{ME}").touch()
        time.sleep(60)
    """)
    code = ("import sys; from streamfn.supervisor import run_workers\n"
            f"sys.exit(run_workers({argv!r}, 2, poll_s=0.02))\n")
    sup = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.monotonic() + 30
    while len(list(tmp_path.glob("up-*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    sup.kill()  # no chance to drain anything itself
    sup.wait()
    while len(list(tmp_path.glob("drained-*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sorted(p.name for p in tmp_path.glob("drained-*")) == ["drained-0", "drained-1"]


# -- `streamfn run --workers N` against a real broker --------------------------------------------------
JOB = Path(__file__).parent / "data" / "workers_job.py"


def _topic(server, n: int, partitions: int = 4) -> str:
    from confluent_kafka.admin import AdminClient, NewTopic

    topic = server.topic_name("workers")
    admin = AdminClient({"bootstrap.servers": server.bootstrap})  # keep it alive until the result is in
    admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])[topic].result(30)
    _produce(server, topic, 0, n)
    return topic


def _produce(server, topic: str, start: int, n: int) -> None:
    import json as _json

    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": server.bootstrap, "linger.ms": 5})
    for i in range(start, start + n):
        producer.produce(topic, _json.dumps({"id": i}).encode(), str(i))
        if i % 1000 == 0:
            producer.poll(0)
    assert producer.flush(30) == 0


def _outputs(out: Path):
    import polars as pl

    files = sorted(out.glob("**/*.jsonl"))
    return pl.concat([pl.read_ndjson(f) for f in files]) if files else pl.DataFrame({"id": [], "kafka_partition": []})


def _cli(server, topic: str, tmp_path: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "streamfn.cli", "run", str(JOB), "--brokers", server.bootstrap,
            "--group", f"{topic}-g", "--quiet", "--log-format", "text",
            "--set", "kafka.session.timeout.ms=1000", "--set", "kafka.heartbeat.interval.ms=200", *extra]


def _env(topic: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "TOPIC": topic, "OUT_DIR": str(tmp_path / "out"), "RUN_DIR": str(tmp_path / "run"),
            **extra}


def _children(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry.name))
    return sorted(kids)


def test_workers_split_one_consumer_group(kafka_tansu, tmp_path: Path) -> None:
    topic = _topic(kafka_tansu, 3000)
    # a slow stage (about 2 s per partition) lets the second worker join before the first drains all
    done = subprocess.run(_cli(kafka_tansu, topic, tmp_path, "--workers", "2", "--until-idle"),
                          env=_env(topic, tmp_path, SLOW_S="1.0"), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    per_worker = [_outputs(tmp_path / "out" / w) for w in ("0", "1")]
    ids = [per_worker[0]["id"].to_list(), per_worker[1]["id"].to_list()]
    assert sorted(set(ids[0]) | set(ids[1])) == list(range(3000))  # nothing lost
    assert ids[0] and ids[1], f"the group did not split: {len(ids[0])} and {len(ids[1])} records"


def test_a_killed_worker_is_restarted_and_nothing_is_lost(kafka_tansu, tmp_path: Path) -> None:
    topic = _topic(kafka_tansu, 0)
    with open(tmp_path / "supervisor.log", "wb") as err, _started(
            _cli(kafka_tansu, topic, tmp_path, "--workers", "2"), env=_env(topic, tmp_path, SLOW_S="0.02"),
            stdout=subprocess.DEVNULL, stderr=err) as sup:
        for start in range(0, 2000, 100):  # spread over seconds, so that both workers are in the group
            _produce(kafka_tansu, topic, start, 100)
            time.sleep(0.4)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not all(_outputs(tmp_path / "out" / w).height for w in ("0", "1")):
            time.sleep(0.1)
        workers = _children(sup.pid)
        assert len(workers) == 2, workers
        os.kill(workers[1], signal.SIGKILL)  # a hard crash of one worker
        _produce(kafka_tansu, topic, 2000, 1000)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(set(_children(sup.pid)) - set(workers)) < 1:
            time.sleep(0.05)
        assert set(_children(sup.pid)) - set(workers), "the killed worker was not restarted"
        seen: set[int] = set()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(seen) < 3000:
            seen = set(_outputs(tmp_path / "out")["id"])
            time.sleep(0.2)
        sup.send_signal(signal.SIGTERM)  # drain both
        assert sup.wait(60) == 0
    assert set(_outputs(tmp_path / "out")["id"]) == set(range(3000))  # at least once, nothing lost


def _two_free_ports() -> int:
    import socket

    for _ in range(50):
        with socket.socket() as a, socket.socket() as b:
            a.bind(("127.0.0.1", 0))
            try:
                b.bind(("127.0.0.1", a.getsockname()[1] + 1))
            except OSError:
                continue
            return int(a.getsockname()[1])
    raise AssertionError("no two adjacent free ports on loopback")


def test_each_worker_serves_status_on_its_own_port(kafka_tansu, tmp_path: Path) -> None:
    import json
    import urllib.request

    topic = _topic(kafka_tansu, 400)
    port = _two_free_ports()
    with open(tmp_path / "supervisor.log", "wb") as err, _started(
            _cli(kafka_tansu, topic, tmp_path, "--workers", "2", "--metrics-port", str(port)),
            env=_env(topic, tmp_path), stdout=subprocess.DEVNULL, stderr=err) as sup:
        owned: dict[int, set[int]] = {}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (len(owned) == 2 and all(owned.values())
                                                   and set().union(*owned.values()) == {0, 1, 2, 3}):
            for worker_port in (port, port + 1):  # worker i on PORT + i
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{worker_port}/status", timeout=2) as answer:
                        status = json.load(answer)
                except OSError:
                    continue
                owned[worker_port] = {int(p["partition"].rsplit("-", 1)[-1]) for p in status["partitions"]}
            time.sleep(0.2)
        assert len(owned) == 2, f"not both workers served /status: {owned}"
        assert set().union(*owned.values()) == {0, 1, 2, 3} and not owned[port] & owned[port + 1], owned
        sup.send_signal(signal.SIGTERM)
        assert sup.wait(60) == 0
