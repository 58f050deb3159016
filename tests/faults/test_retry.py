"""streamfn.retry against a real socket: a server that is away for a while, then back (or not)."""
from __future__ import annotations

import logging
import random
import socket

import pytest
from streamfn.connectors.kafka.broker import free_port

from streamfn.errors import StreamfnError
from streamfn.retry import RetriesExhausted, Retry


def connect(port: int) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=2):
        return "connected"


def test_retries_until_the_server_is_back_with_a_log_line_each(caplog):
    port = free_port()
    listener: list[socket.socket] = []

    def sleep_and_maybe_come_back(seconds: float) -> None:
        if len(caplog.records) == 3:  # the server comes back after the third failure
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
            s.listen(1)
            listener.append(s)

    caplog.set_level(logging.WARNING, logger="streamfn.retry")
    retry = Retry("connect to the store", attempts=6, base_s=0.001, sleep=sleep_and_maybe_come_back,
                  rng=random.Random(1))
    try:
        assert retry.call(connect, port) == "connected"
    finally:
        for s in listener:
            s.close()
    lines = [r for r in caplog.records if r.getMessage() == "retrying after an error"]
    assert [r.attempt for r in lines] == [1, 2, 3]
    assert all("ConnectionRefusedError" in r.error and r.what == "connect to the store" for r in lines)


def test_past_the_limit_one_clear_error(caplog):
    port = free_port()
    retry = Retry("connect to the store", attempts=3, base_s=0.001, sleep=lambda s: None)
    with pytest.raises(RetriesExhausted, match=r"^connect to the store failed 3 times; last error: "
                                               r"ConnectionRefusedError") as info:
        retry.call(connect, port)
    assert isinstance(info.value, StreamfnError) and "\n" not in str(info.value)


def test_answers_are_not_retried():
    calls = []

    def exists() -> None:
        calls.append(1)
        raise FileExistsError("published by another process")

    with pytest.raises(FileExistsError):
        Retry("publish", sleep=lambda s: None).call(exists)
    assert len(calls) == 1


def test_back_off_grows_is_capped_and_jittered():
    retry = Retry("x", base_s=0.5, max_s=4.0, rng=random.Random(3))
    delays = [[retry.delay_s(a) for _ in range(200)] for a in range(6)]
    assert all(0 <= d <= min(4.0, 0.5 * 2 ** a) for a, ds in enumerate(delays) for d in ds)
    assert len({round(d, 6) for d in delays[3]}) > 100  # spread out, not in step
