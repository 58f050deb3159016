"""A moto S3 server for the table-format tests (Delta, Iceberg), on a free loopback port.

`tables_s3` is the session's endpoint URL; `tables_bucket` creates a fresh bucket per test and
sets the AWS_* variables the table libraries read (restored after the test).
"""
from __future__ import annotations

import socket
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
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


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
