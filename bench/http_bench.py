"""HTTP trigger benchmark: N concurrent keep-alive clients over loopback against a trivial stage.

    .venv/bin/python bench/http_bench.py --clients 50 --seconds 10

The pipeline (POST /score -> with_columns -> http.respond) runs in a child process, so that
the load generator does not share its interpreter; the load generator is a minimal HTTP/1.1
client on asyncio (uvloop when installed), one connection per client, each sending its next
request as soon as the answer came (closed loop). Prints requests/s, p50/p90/p99 latency and
the stage's mean batch size.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import signal
import subprocess
import sys
import time
import urllib.request
from typing import Any

BODY = json.dumps({"x": 1.5, "name": "abc"}).encode()


def serve(port: int, max_wait: str, lanes: int, mode: str) -> None:
    """The child process: serve the scoring pipeline until SIGTERM, then print its summary."""
    import polars as pl

    import streamfn as sf
    from streamfn.connectors import http
    from streamfn.log import configure_logging

    configure_logging(level="warning")
    p = sf.Pipeline("http_bench", run_dir=os.environ.get("BENCH_RUN_DIR", "/tmp/streamfn-http-bench"))
    if mode == "handler":  # a Nuclio-style handler, one call per request
        requests = p.source(http.endpoint("/score", port=port, max_wait=max_wait, lanes=lanes, events=True),
                            name="requests")

        def handler(context: Any, event: Any) -> dict[str, Any]:
            return {"x": event.body["x"], "score": event.body["x"] * 2}

        stage = p.stage(requests, name="score")(handler)
    else:
        requests = p.source(http.endpoint("/score", port=port, max_wait=max_wait, lanes=lanes), name="requests")

        @p.stage(requests)
        def score(df: pl.DataFrame) -> pl.DataFrame:
            return df.with_columns((pl.col("x") * 2).alias("score"))

        stage = score
    http.respond(stage)
    summary = p.run()
    stats = summary.nodes["score"]
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"stage_batches": stats.batches, "stage_rows": stats.rows_in,
                      "cpu_s": usage.ru_utime + usage.ru_stime}), flush=True)


async def client(host: str, port: int, stop_at: float, warm_until: float, latencies: list[float],
                 errors: list[int]) -> None:
    """One keep-alive connection sending requests back to back until stop_at."""
    reader, writer = await asyncio.open_connection(host, port)
    request = (f"POST /score HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
               f"content-length: {len(BODY)}\r\n\r\n").encode() + BODY
    try:
        while (now := time.perf_counter()) < stop_at:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            done = time.perf_counter()
            if head[9:12] != b"200":
                errors.append(int(head[9:12]))
            elif now >= warm_until:
                latencies.append(done - now)
    finally:
        writer.close()


async def load(host: str, port: int, clients: int, seconds: float, warmup: float) -> tuple[list[float], list[int]]:
    """Run the clients; return the latencies measured after warm-up and the error statuses."""
    start = time.perf_counter()
    latencies: list[float] = []
    errors: list[int] = []
    await asyncio.gather(*(client(host, port, start + warmup + seconds, start + warmup, latencies, errors)
                           for _ in range(clients)))
    return latencies, errors


def wait_ready(port: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as reply:
                if reply.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise SystemExit("the benchmark pipeline did not become ready")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--port", type=int, default=18080)
    parser.add_argument("--max-wait", default="2ms")
    parser.add_argument("--lanes", type=int, default=1)
    parser.add_argument("--mode", choices=["rows", "handler"], default="rows",
                        help="a DataFrame stage (rows) or a handler(context, event) per request")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.port, args.max_wait, args.lanes, args.mode)
        return
    child = subprocess.Popen([sys.executable, __file__, "--serve", "--port", str(args.port),
                              "--max-wait", args.max_wait, "--lanes", str(args.lanes), "--mode", args.mode],
                             stdout=subprocess.PIPE, text=True)
    try:
        wait_ready(args.port)
        try:
            import uvloop
            runner = uvloop.run
        except ImportError:
            runner = asyncio.run
        latencies, errors = runner(load("127.0.0.1", args.port, args.clients, args.seconds, args.warmup))
    finally:
        child.send_signal(signal.SIGTERM)
        out, _ = child.communicate(timeout=30)
    latencies.sort()
    n = len(latencies)
    pct = lambda q: latencies[min(n - 1, int(q * n))] * 1000  # noqa: E731
    stage = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
    mean_batch = stage.get("stage_rows", 0) / max(1, stage.get("stage_batches", 1))
    print(f"http trigger: {args.clients} clients, {args.seconds:g}s (after {args.warmup:g}s warm-up), "
          f"max_wait={args.max_wait}, lanes={args.lanes}, stage={args.mode}")
    print(f"  requests/s: {n / args.seconds:,.0f}   errors: {len(errors)}")
    print(f"  latency ms: p50 {pct(0.50):.2f}  p90 {pct(0.90):.2f}  p99 {pct(0.99):.2f}  max {latencies[-1] * 1000:.2f}")
    print(f"  stage: {stage.get('stage_batches', '?')} calls, mean batch {mean_batch:.1f} requests")
    served = stage.get("stage_rows", 0)
    if served:  # CPU per request does not depend on what else the machine runs
        per_request_us = stage["cpu_s"] / served * 1e6
        print(f"  server CPU: {per_request_us:.0f} us/request (all threads, incl. start-up), "
              f"i.e. {1e6 / per_request_us:,.0f} requests/s per core; "
              f"cores on this machine: {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
