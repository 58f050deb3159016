"""A throwaway PostgreSQL server for the test session (Debian's postgresql packages).

initdb's a temporary data directory and starts the server on a free loopback port, as the
`postgres` user when the tests run as root (PostgreSQL refuses to run as root). Stopped by
pg_ctl at the end of the session. Exposes `pg_server` (a PgServer) and `pg_dsn`.
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest


def _pg_bin() -> str:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if found:
        return os.path.dirname(found[-1])
    on_path = shutil.which("pg_ctl")
    if on_path:
        return os.path.dirname(on_path)
    raise RuntimeError("PostgreSQL server binaries not found: install the Debian package 'postgresql' "
                       "(listed in .ci/apt-packages.txt)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PgServer:
    """A running throwaway cluster: start/stop it again to test outages."""

    bin_dir: str
    data_dir: str
    port: int
    user: str | None  # the OS user the server runs as (None: this process's user)

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        cmd = [os.path.join(self.bin_dir, args[0]), *args[1:]]
        if self.user is not None:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60)

    def start(self) -> None:
        """Start (or restart) the server and wait until it accepts connections."""
        opts = (f"-h 127.0.0.1 -p {self.port} -k {self.data_dir} -c fsync=off -c full_page_writes=off "
                "-c synchronous_commit=off -c max_connections=100")
        self._run("pg_ctl", "-D", self.data_dir, "-l", os.path.join(self.data_dir, "server.log"), "-w",
                  "-t", "30", "start", "-o", opts)

    def stop(self) -> None:
        """Stop the server now (fast shutdown: clients are disconnected)."""
        self._run("pg_ctl", "-D", self.data_dir, "-m", "fast", "-w", "stop")


def start_server() -> tuple[PgServer, str]:
    """initdb a temp directory and start a server on a free port; returns it and the temp root."""
    root = tempfile.mkdtemp(prefix="streamfn-pg-")
    data = os.path.join(root, "data")
    user = None
    if os.geteuid() == 0:
        user = "postgres"
        entry = pwd.getpwnam(user)
        os.chmod(root, 0o755)
        os.chown(root, entry.pw_uid, entry.pw_gid)
    server = PgServer(_pg_bin(), data, _free_port(), user)
    server._run("initdb", "-D", data, "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync")
    server.start()
    return server, root


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """The session's PostgreSQL server."""
    server, root = start_server()
    try:
        yield server
    finally:
        try:
            server.stop()
        except subprocess.CalledProcessError:
            pass  # already stopped by a test that left it down
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_dsn(pg_server: PgServer) -> str:
    """A DSN for the session's server (trust auth, user postgres)."""
    return pg_server.dsn


@pytest.fixture
def pg_table() -> str:
    """A fresh table name for one test."""
    return f"t_{uuid.uuid4().hex[:10]}"
