"""A small read-only HTTP server for a running job: /status, /metrics, /healthz, /readyz and
the dashboard at /; and `streamfn status URL`, which shows the same status in a terminal."""
from __future__ import annotations

import json
import logging
import os
import sys
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import TYPE_CHECKING, Any, TextIO

from streamfn.errors import ConfigError

if TYPE_CHECKING:
    from streamfn.observe import Observation

log = logging.getLogger("streamfn.observe")

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def prometheus_address(host: str | None, port: int | None) -> tuple[str, int]:
    """The address to serve on: the arguments, else OTEL_EXPORTER_PROMETHEUS_HOST/PORT, else 127.0.0.1:9464."""
    host = host or os.environ.get("OTEL_EXPORTER_PROMETHEUS_HOST") or "127.0.0.1"
    if port is None:
        raw = os.environ.get("OTEL_EXPORTER_PROMETHEUS_PORT", "9464")
        try:
            port = int(raw)
        except ValueError:
            raise ConfigError(f"OTEL_EXPORTER_PROMETHEUS_PORT must be a port number, got {raw!r}") from None
    return host, port


def respond(observation: "Observation", path: str) -> tuple[int, str, bytes] | None:
    """Answer GET `path` for a job: (status code, content type, body); None if not ours.

    The HTTP trigger can mount this next to its own routes to serve /metrics on its port.
    """
    route = path.split("?", 1)[0].rstrip("/") or "/"
    monitor = observation.monitor
    if route == "/status" and monitor is not None:
        return 200, "application/json", json.dumps(monitor.status(), default=str).encode()
    if route == "/metrics":
        from streamfn.observe.metrics import render_prometheus

        reader = observation.scrape_reader
        text = render_prometheus(reader.get_metrics_data()) if reader is not None else ""
        return 200, PROMETHEUS_CONTENT_TYPE, text.encode()
    if route in ("/healthz", "/readyz"):
        return _probe(observation, ready=route == "/readyz")
    if route in ("/", "/index.html"):
        page = resources.files("streamfn.observe").joinpath("dashboard.html").read_bytes()
        return 200, "text/html; charset=utf-8", page
    return None


def _probe(observation: "Observation", *, ready: bool) -> tuple[int, str, bytes]:
    runtime, observer = observation.runtime, observation.observer
    failed = runtime is not None and (runtime.error is not None or (observer is not None and observer.error))
    if failed:
        return 503, "text/plain", b"failed\n"
    if ready and (runtime is None or runtime.stopping or (observer is not None and observer.finished_at)):
        return 503, "text/plain", b"not ready\n"
    return 200, "text/plain", b"ok\n"


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        try:
            answer = respond(self.server.observation, self.path)
        except Exception:  # a broken page must not take the job down; say so and go on
            log.exception("status request failed", extra={"path": self.path})
            answer = (500, "text/plain", b"internal error\n")
        code, ctype, body = answer or (404, "text/plain", b"not found: try /, /status, /metrics, /healthz\n")
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        log.debug("status request", extra={"request": format % args})


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    observation: "Observation"


class StatusServer:
    """Serves one observation's endpoints on a background thread."""

    def __init__(self, observation: "Observation", *, host: str, port: int) -> None:
        try:
            self._server = _Server((host, port), _Handler)
        except OSError as exc:
            raise ConfigError(f"cannot serve metrics and status on {host}:{port}: {exc.strerror}; "
                              "pick another --metrics-port") from exc
        self._server.observation = observation
        self.host, self.port = host, self._server.server_address[1]
        # a short poll interval: close() waits for the serving loop to notice, and the run's end waits on close()
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="streamfn-status", daemon=True)
        self._thread.start()
        log.info("serving status and metrics", extra={"pipeline": observation.pipeline.name, "url": self.url})

    @property
    def url(self) -> str:
        """The base URL (`/status`, `/metrics`, `/` hang off it)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def close(self) -> None:
        """Stop serving and release the port."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


def fetch_status(url: str, *, timeout_s: float = 5.0) -> dict[str, Any]:
    """GET a job's status document; `url` is the job's base URL or its /status URL."""
    base = url if "://" in url else f"http://{url}"
    target = base if base.rstrip("/").endswith("/status") else base.rstrip("/") + "/status"
    with urllib.request.urlopen(target, timeout=timeout_s) as response:  # noqa: S310 (an operator's URL)
        return json.loads(response.read())  # type: ignore[no-any-return]


def status_cli(url: str, *, as_json: bool = False, stream: TextIO | None = None) -> int:
    """`streamfn status URL`: print a job's status; 0 if healthy, 1 if failed or unreachable."""
    from streamfn.observe.progress import render_lines

    out = stream or sys.stdout
    try:
        status = fetch_status(url)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        print(f"cannot read the status at {url}: {reason}; is the job running with --metrics-port?",
              file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(status, indent=2), file=out)
    else:
        print("\n".join(render_lines(status, width=120)), file=out)
    return 0 if status.get("health") == "ok" else 1
