"""One uvicorn server per (host, port), on its own thread and event loop, shared by endpoints.

uvicorn (with uvloop and httptools when installed) is the ASGI server: maintained, standard,
and fast enough that HTTP parsing is not the bottleneck of a micro-batched pipeline (see
docs/triggers.md for figures).
"""
from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from streamfn._optional import import_optional
from streamfn.errors import ConfigError

log = logging.getLogger("streamfn.http")

HEALTH_PATHS = ("/healthz", "/readyz")

_lock = threading.Lock()
_servers: dict[tuple[str, int], "HttpServer"] = {}


class Request:
    """The parts of an ASGI request an endpoint reads (no framework objects on the hot path)."""

    __slots__ = ("scope", "receive", "method", "path", "query", "_headers")

    def __init__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[dict[str, Any]]]) -> None:
        self.scope, self.receive = scope, receive
        self.method: str = scope["method"]
        self.path: str = scope["path"]
        self.query: str = scope.get("query_string", b"").decode("latin-1")
        self._headers: dict[str, str] | None = None

    @property
    def headers(self) -> dict[str, str]:
        """Header names in lower case; a repeated header keeps its last value."""
        if self._headers is None:
            self._headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in self.scope["headers"]}
        return self._headers

    def header(self, name: bytes) -> str | None:
        """One header's value without building the whole dict (name in lower case)."""
        for key, value in self.scope["headers"]:
            if key == name:
                return value.decode("latin-1")  # type: ignore[no-any-return]
        return None

    async def chunks(self) -> Any:
        """The body, as it arrives."""
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                return
            yield message.get("body", b"")
            if not message.get("more_body", False):
                return


Answer = tuple[int, bytes, str, dict[str, str]]  # status, body, content type, headers
Endpoint = Callable[[Request], Awaitable[Answer]]


Guard = Callable[[Request], "Answer | None"]  # None: let the request in; else the answer that refuses it


class _Route:
    __slots__ = ("path", "prefix", "endpoint", "methods", "guard")

    def __init__(self, path: str, endpoint: Endpoint, methods: list[str] | None, guard: Guard | None) -> None:
        self.prefix = path.endswith("/*")
        self.path = path[:-2] if self.prefix else path
        self.endpoint, self.methods, self.guard = endpoint, methods, guard

    def matches(self, path: str) -> bool:
        if not self.prefix:
            return path == self.path
        return path == (self.path or "/") or path.startswith(self.path + "/")


class HttpServer:
    """A running uvicorn server whose routes endpoints add and remove.

    The app speaks ASGI directly: it needs exact-path (and prefix) routing only, and a
    framework's routing and middleware stack cost about a quarter of the server's CPU per
    request in profiles of the benchmark.
    """

    def __init__(self, host: str, port: int, tls: tuple[str, str] | None = None) -> None:
        uvicorn = import_optional("uvicorn", extra="http")
        if tls:
            _check_tls_files(tls)  # before binding: a bad file must not leave a socket open
        self.host, self.tls = host, tls
        self.routes: list[_Route] = []
        self.readiness: list[Callable[[], bool]] = []
        self.sock = _bind(host, port)
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="off",
                                timeout_keep_alive=15, backlog=2048, server_header=False,
                                timeout_graceful_shutdown=5, proxy_headers=False, interface="asgi3",
                                ssl_certfile=tls[0] if tls else None, ssl_keyfile=tls[1] if tls else None)
        self._server = uvicorn.Server(config)
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._serve, name=f"streamfn-http-{self.port}", daemon=True)
        self._users = 0
        self._error: BaseException | None = None

    def _serve(self) -> None:
        try:
            self._server.run(sockets=[self.sock])
        except BaseException as exc:  # reported to start(), which waits for the server
            self._error = exc

    def start(self, timeout_s: float = 10.0) -> None:
        """Serve on a thread; return once the server accepts connections."""
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.005)
        if not self._server.started:
            raise ConfigError(f"the HTTP server on {self.host}:{self.port} did not start: {self._error}")
        self.loop = _loop_of(self._server)

    @property
    def scheme(self) -> str:
        """'https' when the server speaks TLS."""
        return "https" if self.tls else "http"

    def stop(self) -> None:
        """Stop accepting requests, finish those in flight, and join the thread."""
        self._server.should_exit = True
        self._thread.join(10)

    # -- routes -------------------------------------------------------------------------------
    def add_route(self, path: str, endpoint: Endpoint, methods: list[str] | None,
                  ready: Callable[[], bool], guard: Guard | None = None) -> None:
        """Route `path` (and, for a path ending in '/*', everything under it) to `endpoint`."""
        route = _Route(path, endpoint, methods, guard)
        for other in self.routes:
            if (other.path, other.prefix) == (route.path, route.prefix):
                raise ConfigError(f"{self.host}:{self.port} already serves {path!r}; "
                                  "give each endpoint its own path")
        # exact paths first, then the longest prefix
        self.routes = sorted([*self.routes, route], key=lambda r: (r.prefix, -len(r.path)))
        self.readiness.append(ready)

    def remove_route(self, endpoint: Endpoint, ready: Callable[[], bool]) -> None:
        """Forget an endpoint's routes."""
        self.routes = [r for r in self.routes if r.endpoint is not endpoint]
        if ready in self.readiness:
            self.readiness.remove(ready)

    async def app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """The ASGI application: health, readiness, then the endpoints' routes."""
        if scope["type"] != "http":
            return
        path = scope["path"]
        if path in HEALTH_PATHS and scope["method"] in ("GET", "HEAD"):
            answer = self._health() if path == "/healthz" else self._ready()
        else:
            answer = await self._route(scope, receive, path)
        await send_answer(send, answer)

    async def _route(self, scope: dict[str, Any], receive: Any, path: str) -> Answer:
        for route in self.routes:
            if route.matches(path):
                if route.methods is not None and scope["method"] not in route.methods:
                    return _json(405, {"error": f"method {scope['method']} not allowed; use "
                                                f"{', '.join(route.methods)}"})
                request = Request(scope, receive)
                if route.guard is not None and (denied := route.guard(request)) is not None:
                    return denied  # before the body is read: a refused caller costs no decoding
                try:
                    return await route.endpoint(request)
                except Exception:  # never a traceback to the client; the log has it
                    log.exception("http endpoint failed", extra={"path": path})
                    return _json(500, {"error": "internal error; see the server log"})
        return _json(404, {"error": f"no endpoint at {path}"})

    def _health(self) -> Answer:
        return _json(200, {"status": "ok"})

    def _ready(self) -> Answer:
        ready = bool(self.readiness) and all(check() for check in self.readiness)
        return _json(200 if ready else 503, {"ready": ready})


async def send_answer(send: Any, answer: Answer) -> None:
    """Send (status, body, content type, headers) as an ASGI response."""
    status, body, content_type, headers = answer
    raw = [(b"content-type", content_type.encode("latin-1")), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode("latin-1"), str(v).encode("latin-1")) for k, v in headers.items()
            if k.lower() not in ("content-type", "content-length")]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def _json(status: int, value: Any) -> Answer:
    return status, json.dumps(value).encode(), "application/json", {}


def acquire(host: str, port: int, tls: tuple[str, str] | None = None) -> HttpServer:
    """The server on (host, port), started on first use (port 0: a free port); TLS with (cert, key)."""
    with _lock:
        server = _servers.get((host, port)) if port else None
        if server is not None and server.tls != tls:
            raise ConfigError(f"{host}:{port} is already served {'with' if server.tls else 'without'} TLS; "
                              "endpoints sharing a port need the same tls_cert/tls_key")
        if server is None:
            server = HttpServer(host, port, tls)
            server.start()
            _servers[(host, server.port)] = server
            log.info("http server listening", extra={"url": f"{server.scheme}://{_url_host(host)}:{server.port}"})
        server._users += 1
        return server


def release(server: HttpServer) -> None:
    """Stop the server once no endpoint uses it."""
    with _lock:
        server._users -= 1
        if server._users > 0:
            return
        _servers.pop((server.host, server.port), None)
    server.stop()
    log.info("http server stopped", extra={"url": f"{server.scheme}://{_url_host(server.host)}:{server.port}"})


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}; choose another port "
                          "with --port or http.endpoint(port=...)") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _check_tls_files(tls: tuple[str, str]) -> None:
    import ssl

    try:  # uvicorn would fail later, on its thread; say what is wrong here
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(tls[0], tls[1])
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot use the TLS certificate {tls[0]} with key {tls[1]}: {exc}; give a PEM "
                          "certificate (chain) and its private key") from None


def _loop_of(server: Any) -> asyncio.AbstractEventLoop:
    # uvicorn keeps its asyncio servers; each knows the loop it runs on
    for srv in getattr(server, "servers", []):
        loop = getattr(srv, "_loop", None) or getattr(srv, "get_loop", lambda: None)()
        if loop is not None:
            return loop  # type: ignore[no-any-return]
    raise ConfigError("the HTTP server started without an event loop")


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
