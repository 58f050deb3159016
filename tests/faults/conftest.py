"""Keep tests in this folder from leaking logging set-up into each other.

`streamfn.cli.main` calls `configure_logging`, which points the "streamfn" logger at the stderr of
the moment (a capture buffer that pytest closes after the test) and stops propagation; later
tests would then log into a closed file and `caplog` would see nothing.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _restore_streamfn_logging() -> Iterator[None]:
    logger = logging.getLogger("streamfn")
    saved = (list(logger.handlers), logger.propagate, logger.level)
    yield
    logger.handlers[:] = saved[0]
    logger.propagate, logger.level = saved[1], saved[2]
