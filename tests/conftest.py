"""Shared fixtures. Real servers live in tests/servers/, one module each, loaded here."""
from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

pytest_plugins: list[str] = ["tests.servers.postgres", "tests.servers.s3_tables", "tests.servers.kafka",
                             "tests.servers.s3", "tests.servers.v3io", "tests.servers.iceberg_rest"]


@pytest.fixture
def run_dir(tmp_path):
    """A fresh run directory for a pipeline (dead letters, checkpoints)."""
    return str(tmp_path / "run")


@pytest.fixture(autouse=True)
def _restore_streamfn_logging() -> Iterator[None]:
    """Keep one test's logging set-up from leaking into the next.

    `streamfn.cli.main` calls `configure_logging`, which points the "streamfn" logger at the
    stderr of the moment (a capture buffer pytest closes after the test) and stops propagation;
    later tests would log into a closed file and `caplog` would see nothing.
    """
    logger = logging.getLogger("streamfn")
    saved = (list(logger.handlers), logger.propagate, logger.level)
    yield
    logger.handlers[:] = saved[0]
    logger.propagate, logger.level = saved[1], saved[2]
