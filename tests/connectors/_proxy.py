"""A TCP forwarder on loopback, run as its own process by the outage tests.

    python -m tests.connectors._proxy LISTEN_PORT TARGET_PORT

Killing the process cuts every connection and refuses new ones; starting it again on the
same port brings the target back. (A thread in the test process would not do: deltalake's
native calls hold the GIL while they wait for the network.)
"""
from __future__ import annotations

import socket
import sys
import threading


def pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass  # one side went away: close both
    finally:
        for s in (src, dst):
            s.close()


def main(listen_port: int, target_port: int) -> None:
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", listen_port))
    listener.listen(64)
    print("ready", flush=True)
    while True:
        client, _ = listener.accept()
        try:
            upstream = socket.create_connection(("127.0.0.1", target_port))
        except OSError:
            client.close()
            continue
        for a, b in ((client, upstream), (upstream, client)):
            threading.Thread(target=pump, args=(a, b), daemon=True).start()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
