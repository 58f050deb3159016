"""A v3io-frames test double: framesd's HTTP and gRPC wire protocols on 127.0.0.1, over the in-memory
FramesStore (tests/servers/v3io_store.py says what it models and what it does not).

HTTP (v3io_frames/http.py, framesd http/server.go): every call is a POST to /{action} with the session
in the body. /version {} -> {"version"}; /create, /delete, /exec take JSON; /write takes a chunked body
of [int64 LE length][InitialWriteRequest] then [int64 LE length][Frame]... and answers
{"num_frames", "num_rows"}; /read takes JSON and answers [int64 LE length][Frame]... until EOF, a
Frame with .error set for a failed read. Connection: close is honoured (urllib3 would otherwise reuse
a closed socket). gRPC: the package's own FramesServicer (Read: unary -> stream of Frame; Write:
stream of WriteRequest whose first message carries .request).

Fixtures: `v3io_server` (HTTP) and `v3io_grpc_server`, each with .address, .store and .access_key;
the store is emptied for every test.
"""
from __future__ import annotations

import json
import struct
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
import pytest
from google.protobuf.json_format import MessageToDict
from v3io_frames import frames_pb2 as fpb
from v3io_frames import frames_pb2_grpc as fgrpc

from tests.servers.v3io_store import VERSION, FramesError, FramesStore

ACCESS_KEY = "test-access-key"
_HEADER = struct.Struct("<q")


def _split_messages(body: bytes) -> list[bytes]:
    out, at = [], 0
    while at < len(body):
        (size,) = _HEADER.unpack_from(body, at)
        out.append(body[at + 8:at + 8 + size])
        at += 8 + size
    return out


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    store: FramesStore

    def log_message(self, format: str, *args: Any) -> None:  # keep pytest output clean
        pass

    def do_POST(self) -> None:
        action = self.path.strip("/")
        body = self._body()
        try:
            if action == "version":
                return self._reply(200, json.dumps({"version": VERSION}).encode())
            if action == "write":
                messages = _split_messages(body)
                request = fpb.InitialWriteRequest.FromString(messages[0])
                frames = [fpb.Frame.FromString(m) for m in messages[1:]]
                n_frames, n_rows = self.store.write(request, frames)
                return self._reply(200, json.dumps({"num_frames": n_frames, "num_rows": n_rows}).encode())
            req = json.loads(body or b"{}")
            if action == "read":
                payload = b"".join(_HEADER.pack(len(d)) + d for d in
                                   (f.SerializeToString() for f in self._read(req)))
                return self._reply(200, payload, "application/octet-stream")
            if action == "create":
                extra = {k: req.get(k) for k in ("rate", "shards", "retention_hours")}
                self.store.create(req.get("session") or {}, req.get("backend", ""), req.get("table", ""),
                                  int(req.get("if_exists") or 0), extra)
            elif action == "delete":
                self.store.delete(req.get("session") or {}, req.get("backend", ""), req.get("table", ""),
                                  int(req.get("if_missing") or 0), req.get("filter") or "")
            elif action == "exec":
                raise FramesError(f"exec {req.get('command')!r} is not supported by the test double")
            else:
                return self._reply(404, f"unknown action {action!r}".encode())
            return self._reply(200, b"{}")
        except FramesError as exc:
            return self._reply(400, str(exc).encode(), "text/plain")

    def _read(self, req: dict[str, Any]) -> list[fpb.Frame]:
        try:
            return self.store.read(req)
        except FramesError as exc:  # framesd reports a failed read inside the stream
            return [fpb.Frame(error=str(exc))]

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()  # the blank line after the last chunk
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _reply(self, status: int, payload: bytes, ctype: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(payload)))
        if self.headers.get("Connection", "").lower() == "close":
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(payload)


class _Servicer(fgrpc.FramesServicer):
    def __init__(self, store: FramesStore) -> None:
        self.store = store

    def _fail(self, context: grpc.ServicerContext, exc: FramesError) -> None:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    def Version(self, request: Any, context: grpc.ServicerContext) -> Any:
        return fpb.VersionResponse(version=VERSION)

    def Read(self, request: fpb.ReadRequest, context: grpc.ServicerContext) -> Iterator[fpb.Frame]:
        req = MessageToDict(request, preserving_proto_field_name=True)
        req["session"] = MessageToDict(request.session, preserving_proto_field_name=True)
        try:
            yield from self.store.read(req)
        except FramesError as exc:
            self._fail(context, exc)

    def Write(self, request_iterator: Iterator[fpb.WriteRequest], context: grpc.ServicerContext) -> Any:
        first = next(request_iterator)
        frames = [m.frame for m in request_iterator]
        try:
            n_frames, n_rows = self.store.write(first.request, frames)
        except FramesError as exc:
            self._fail(context, exc)
        return fpb.WriteRespose(frames=n_frames, rows=n_rows)

    def Create(self, request: fpb.CreateRequest, context: grpc.ServicerContext) -> Any:
        session = MessageToDict(request.session, preserving_proto_field_name=True)
        try:
            self.store.create(session, request.backend, request.table, request.if_exists,
                              {"rate": request.rate, "shards": request.shards,
                               "retention_hours": request.retention_hours})
        except FramesError as exc:
            self._fail(context, exc)
        return fpb.CreateResponse()

    def Delete(self, request: fpb.DeleteRequest, context: grpc.ServicerContext) -> Any:
        session = MessageToDict(request.session, preserving_proto_field_name=True)
        try:
            self.store.delete(session, request.backend, request.table, request.if_missing, request.filter)
        except FramesError as exc:
            self._fail(context, exc)
        return fpb.DeleteResponse()


@dataclass
class FramesServer:
    """A running double: where it listens and what it stores."""

    address: str
    store: FramesStore
    access_key: str = ACCESS_KEY


@pytest.fixture(scope="session")
def _v3io_http() -> Iterator[FramesServer]:
    store = FramesStore(ACCESS_KEY)
    handler = type("Handler", (_Handler,), {"store": store})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="v3io-double-http", daemon=True)
    thread.start()
    yield FramesServer(f"http://127.0.0.1:{server.server_address[1]}", store)
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.fixture(scope="session")
def _v3io_grpc() -> Iterator[FramesServer]:
    store = FramesStore(ACCESS_KEY)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    fgrpc.add_FramesServicer_to_server(_Servicer(store), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield FramesServer(f"grpc://127.0.0.1:{port}", store)
    server.stop(grace=1).wait(5)


@pytest.fixture
def v3io_server(_v3io_http: FramesServer) -> FramesServer:
    """framesd's HTTP API on 127.0.0.1, empty for this test."""
    _v3io_http.store.tables.clear()
    _v3io_http.store.requests.clear()
    return _v3io_http


@pytest.fixture
def v3io_grpc_server(_v3io_grpc: FramesServer) -> FramesServer:
    """framesd's gRPC API on 127.0.0.1, empty for this test."""
    _v3io_grpc.store.tables.clear()
    _v3io_grpc.store.requests.clear()
    return _v3io_grpc
