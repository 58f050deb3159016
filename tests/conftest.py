"""Shared fixtures. Real servers live in tests/servers/, one module each, loaded here."""
from __future__ import annotations

import pytest

pytest_plugins: list[str] = ["tests.servers.postgres", "tests.servers.s3_tables", "tests.servers.kafka", "tests.servers.s3", "tests.servers.v3io"]


@pytest.fixture
def run_dir(tmp_path):
    """A fresh run directory for a pipeline (dead letters, checkpoints)."""
    return str(tmp_path / "run")
