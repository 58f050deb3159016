"""A moto S3 server for checkpoint tests, on a free loopback port, stopped at the end of the session.

`s3_server` is the endpoint URL; `s3_bucket` makes a fresh bucket per test and gives the
settings a pipeline needs to keep its checkpoints there (`checkpoint.storage.*` go to s3fs).
"""
from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class S3Bucket:
    """A bucket on the test server and how to reach it."""

    endpoint: str
    name: str

    def url(self, prefix: str) -> str:
        """An s3:// URL under this bucket."""
        return f"s3://{self.name}/{prefix}"

    def settings(self) -> dict[str, str]:
        """Run settings that point a pipeline's checkpoints at this server."""
        return {"checkpoint.storage.endpoint_url": self.endpoint, "checkpoint.storage.key": "testing",
                "checkpoint.storage.secret": "testing"}


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """The endpoint of a moto S3 server that lives for the test session."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server: str) -> S3Bucket:
    """A new, empty bucket on the session's moto server."""
    import boto3

    name = f"ck-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    client.create_bucket(Bucket=name)
    client.close()
    return S3Bucket(s3_server, name)
