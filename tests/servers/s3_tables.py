"""A moto S3 server for the table-format tests (Delta, Iceberg), on a free loopback port.

It runs as its own process: deltalake's native calls hold the GIL while they wait for S3,
so an in-process (threaded) moto server would never get to answer them.

`tables_s3` is the session's endpoint URL; `tables_bucket` creates a fresh bucket per test and
sets the AWS_* variables the table libraries read (restored after the test).
"""
from __future__ import annotations

import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
          "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def tables_s3() -> Iterator[str]:
    """The endpoint of a moto server that lives for the session."""
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("moto server did not start") from None
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture
def tables_bucket(tables_s3: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A new bucket for one test; AWS_ENDPOINT_URL and credentials point at the moto server."""
    import boto3

    for key, value in {**S3_ENV, "AWS_ENDPOINT_URL": tables_s3}.items():
        monkeypatch.setenv(key, value)
    name = f"b-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", endpoint_url=tables_s3, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    client.create_bucket(Bucket=name)
    client.close()
    return name
