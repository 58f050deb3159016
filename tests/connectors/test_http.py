"""The HTTP trigger over real loopback HTTP: round trips, micro-batching, bad requests, errors."""
from __future__ import annotations

import asyncio
import io
import json
import socket
import subprocess
import sys
import threading
import time

import httpx
import polars as pl
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import streamfn as sf
from streamfn.connectors import http, memory
from streamfn.connectors.http import codec
from streamfn.errors import ConfigError, GraphError
from tests.helpers import read_dead_letters
from tests.servers.http import serving

pytestmark = pytest.mark.integration


def scoring_pipeline(run_dir: str, **endpoint_options) -> tuple[sf.Pipeline, list[int]]:
    """POST /score rows {x} -> rows {x, y=2x}; a row with x < 0 makes the stage raise."""
    p = sf.Pipeline("scoring", run_dir=run_dir)
    requests = p.source(http.endpoint("/score", port=0, **endpoint_options), name="requests")
    batch_sizes: list[int] = []

    @p.stage(requests)
    def score(df: pl.DataFrame) -> pl.DataFrame:
        batch_sizes.append(df.height)
        if (df["x"] < 0).any():
            raise ValueError("x must not be negative")
        return df.with_columns((pl.col("x") * 2).alias("y"))

    http.respond(score)
    return p, batch_sizes


def test_json_round_trip(run_dir):
    p, _ = scoring_pipeline(run_dir)
    with serving(p) as run, httpx.Client() as client:
        url = run.url("requests")
        one = client.post(url, json={"x": 1})
        many = client.post(url, json=[{"x": 1}, {"x": 2}])
        empty = client.post(url, json=[])
    assert (one.status_code, one.json()) == (200, {"x": 1, "y": 2})
    assert one.headers["x-request-id"]
    assert many.json() == [{"x": 1, "y": 2}, {"x": 2, "y": 4}]
    assert (empty.status_code, empty.json()) == (200, [])
    assert run.error is None and run.summary is not None
    assert run.summary.rows_out("score") == 3


@pytest.mark.parametrize("content_type,body,parse", [
    ("application/x-ndjson", b'{"x": 1}\n{"x": 3}\n', lambda b: [json.loads(x) for x in b.splitlines()]),
    ("text/csv", b"x\n1\n3\n", lambda b: pl.read_csv(io.BytesIO(b)).to_dicts()),
])
def test_text_formats_answer_in_kind(run_dir, content_type, body, parse):
    p, _ = scoring_pipeline(run_dir)
    with serving(p) as run, httpx.Client() as client:
        reply = client.post(run.url("requests"), content=body, headers={"content-type": content_type})
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith(content_type)
    assert parse(reply.content) == [{"x": 1, "y": 2}, {"x": 3, "y": 6}]


def test_arrow_ipc_round_trip(run_dir):
    p, _ = scoring_pipeline(run_dir)
    sink = io.BytesIO()
    table = pa.table({"x": [5, 6]})
    with ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    with serving(p) as run, httpx.Client() as client:
        reply = client.post(run.url("requests"), content=sink.getvalue(),
                            headers={"content-type": "application/vnd.apache.arrow.stream"})
    assert reply.status_code == 200
    answer = ipc.open_stream(pa.py_buffer(reply.content)).read_all()
    assert answer.to_pydict() == {"x": [5, 6], "y": [10, 12]}


@pytest.mark.parametrize("lanes", [1, 2])
def test_concurrent_requests_share_one_stage_call(run_dir, lanes):
    p, batch_sizes = scoring_pipeline(run_dir, max_wait="1s", lanes=lanes)  # room for slow CI

    async def send_all(url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient() as client:
            return await asyncio.gather(*(client.post(url, json={"x": i}) for i in range(20)))

    with serving(p) as run:
        replies = asyncio.run(send_all(run.url("requests")))
    assert [r.json() for r in replies] == [{"x": i, "y": 2 * i} for i in range(20)]
    assert sum(batch_sizes) == 20
    assert len(batch_sizes) < 20 and max(batch_sizes) > 1  # micro-batched: fewer calls than requests


def test_without_respond_requests_get_202_and_rows_reach_the_sink(run_dir):
    p = sf.Pipeline("ingest", run_dir=run_dir, checkpoint_interval="10ms")
    events = p.source(http.endpoint("/events", port=0), name="events")
    out = memory.sink()
    events.sink(out)
    with serving(p) as run, httpx.Client() as client:
        replies = [client.post(run.url("events"), json=[{"v": i}, {"v": -i}]) for i in range(3)]
        _wait_for(lambda: out.frame().height == 6)
    assert [r.status_code for r in replies] == [202, 202, 202]
    assert all(r.json()["rows"] == 2 and r.json()["id"] for r in replies)
    assert len({r.json()["id"] for r in replies}) == 3
    assert sorted(out.frame()["v"].to_list()) == [-2, -1, 0, 0, 1, 2]
    assert "_request_id" not in out.frame().columns  # only added when the endpoint answers


@pytest.mark.parametrize("content_type,body,status,reason", [
    ("application/json", b'{"x": 1', 400, "malformed JSON"),
    ("application/json", b"[1, 2]", 400, "object or an array of objects"),
    ("text/csv", b'x\n"1\n', 400, "malformed csv"),
    ("application/xml", b"<x/>", 415, "unsupported content type"),
])
def test_malformed_bodies_get_4xx_and_a_dead_letter(run_dir, content_type, body, status, reason):
    p, batch_sizes = scoring_pipeline(run_dir)
    with serving(p) as run, httpx.Client() as client:
        reply = client.post(run.url("requests"), content=body, headers={"content-type": content_type})
        good = client.post(run.url("requests"), json={"x": 4})
    assert reply.status_code == status
    assert reason in reply.json()["error"] and reply.json()["id"]
    assert good.json() == {"x": 4, "y": 8}
    letters = read_dead_letters(run_dir)
    assert len(letters) == 1 and reason in letters[0]["error"]
    assert letters[0]["offset"] == reply.json()["id"] and letters[0]["payload"] == body.decode()
    assert batch_sizes == [1]  # the bad request never reached the stage


def test_schema_mismatch_gets_422(run_dir):
    p, _ = scoring_pipeline(run_dir, schema={"x": pl.Int64})
    with serving(p) as run, httpx.Client() as client:
        wrong_type = client.post(run.url("requests"), json={"x": "not a number"})
        missing = client.post(run.url("requests"), json={"z": 1})
        cast = client.post(run.url("requests"), json={"x": 2.0})
    assert wrong_type.status_code == 422 and "schema mismatch" in wrong_type.json()["error"]
    assert missing.status_code == 422 and "missing column(s) 'x'" in missing.json()["error"]
    assert cast.json() == {"x": 2, "y": 4}
    assert len(read_dead_letters(run_dir)) == 2


def test_oversized_bodies_get_413(run_dir):
    p, batch_sizes = scoring_pipeline(run_dir, max_body_bytes=64)
    big = json.dumps([{"x": i} for i in range(50)]).encode()

    def chunks():  # no content-length: the limit is enforced while reading
        yield big[:40]
        yield big[40:]

    with serving(p) as run, httpx.Client() as client:
        declared = client.post(run.url("requests"), content=big, headers={"content-type": "application/json"})
        streamed = client.post(run.url("requests"), content=chunks(), headers={"content-type": "application/json"})
        small = client.post(run.url("requests"), json={"x": 1})
    assert declared.status_code == 413 and "64 bytes" in declared.json()["error"]
    assert streamed.status_code == 413
    assert small.status_code == 200
    assert batch_sizes == [1]


def test_raising_stage_answers_500_without_a_traceback(run_dir):
    p, _ = scoring_pipeline(run_dir, max_wait="300ms")

    async def send(url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient() as client:
            return await asyncio.gather(client.post(url, json={"x": 1}), client.post(url, json={"x": -1}),
                                        client.post(url, json={"x": 2}))

    with serving(p) as run:
        ok1, bad, ok2 = asyncio.run(send(run.url("requests")))
    assert ok1.json() == {"x": 1, "y": 2} and ok2.json() == {"x": 2, "y": 4}
    assert bad.status_code == 500
    assert bad.json()["error"] == "stage 'score' raised ValueError"
    assert "Traceback" not in bad.text and "negative" not in bad.text
    letters = read_dead_letters(run_dir)
    assert len(letters) == 1 and "x must not be negative" in letters[0]["error"]
    assert run.error is None


def test_output_without_request_ids_is_a_500_not_a_wrong_answer(run_dir):
    p = sf.Pipeline("lossy", run_dir=run_dir)
    requests = p.source(http.endpoint("/", port=0, max_wait="300ms"), name="requests")
    http.respond(requests.stage(lambda df: df.select(pl.col("x")), name="drop_ids"))

    async def send(url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient() as client:
            return await asyncio.gather(*(client.post(url, json={"x": i}) for i in range(3)))

    with serving(p) as run:
        replies = asyncio.run(send(run.url("requests")))
    statuses = {r.status_code for r in replies}
    assert statuses <= {200, 500}
    assert all("_request_id" in r.json()["error"] for r in replies if r.status_code == 500)


def test_health_readiness_and_methods(run_dir):
    p, _ = scoring_pipeline(run_dir)
    with serving(p) as run, httpx.Client() as client:
        base = run.url("requests").rsplit("/", 1)[0]
        health = client.get(base + "/healthz")
        ready = client.get(base + "/readyz")
        wrong_method = client.get(run.url("requests"))
    assert health.json() == {"status": "ok"}
    assert (ready.status_code, ready.json()) == (200, {"ready": True})
    assert wrong_method.status_code == 405


def test_port_and_host_come_from_settings(run_dir):
    port = _free_port()
    p = sf.Pipeline("settings", run_dir=run_dir)
    requests = p.source(http.endpoint("/echo"), name="requests")
    http.respond(requests)
    with serving(p, settings={"http.port": str(port), "http.host": "127.0.0.1"}) as run:
        assert run.url("requests") == f"http://127.0.0.1:{port}/echo"
        status, body = http.invoke("/echo", b'{"a": 1}', "application/json", port=port)
        status2, body2 = http.invoke(f"http://127.0.0.1:{port}/echo", b"a\n7\n", "text/csv")
    assert (status, json.loads(body)) == (200, {"a": 1})
    assert (status2, body2) == (200, b"a\n7\n")


def test_invoke_says_when_nothing_listens():
    with pytest.raises(http.client.InvokeError, match="could not reach"):
        http.invoke(f"http://127.0.0.1:{_free_port()}/x", b"{}", "application/json", timeout_s=2)


def test_max_requests_ends_an_until_idle_run(run_dir):
    p = sf.Pipeline("bounded", run_dir=run_dir)
    source = http.endpoint("/in", port=0, max_requests=2)
    events = p.source(source, name="events")
    out = memory.sink()
    events.sink(out)
    done = threading.Event()
    summary = {}

    def run() -> None:
        summary["s"] = p.run(until_idle=True, handle_signals=False)
        done.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    while source._server is None or not source._ready():  # noqa: SLF001
        assert not done.wait(0.01)
    with httpx.Client() as client:
        assert client.post(source.url, json={"n": 1}).status_code == 202
        assert client.post(source.url, json={"n": 2}).status_code == 202
    assert done.wait(20), "the run did not end after max_requests"
    assert out.frame()["n"].to_list() == [1, 2]


def test_a_busy_port_is_a_clear_error(run_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        p, _ = scoring_pipeline(run_dir)
        p.node("requests").connector.port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match="cannot listen on 127.0.0.1"):
            p.run(handle_signals=False)


def test_respond_needs_an_http_endpoint_upstream():
    p = sf.Pipeline("nohttp")
    rows = p.source(memory.source([{"x": 1}]))
    with pytest.raises(GraphError, match="no http.endpoint feeds"):
        http.respond(rows)


def test_endpoint_arguments_are_checked():
    with pytest.raises(ConfigError, match="starts with '/'"):
        http.endpoint("score")
    with pytest.raises(ConfigError, match="health path"):
        http.endpoint("/healthz")


def _wait_for(condition, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_full_queue_gets_503_and_unprocessed_accepted_requests_are_dead_letters(run_dir):
    p = sf.Pipeline("slow", run_dir=run_dir)
    events = p.source(http.endpoint("/in", port=0, max_wait="60s", max_pending=2), name="events")
    events.sink(memory.sink())
    with serving(p) as run, httpx.Client() as client:
        accepted = [client.post(run.url("events"), json={"n": i}) for i in range(2)]
        refused = client.post(run.url("events"), json={"n": 2})
    assert [r.status_code for r in accepted] == [202, 202]
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    letters = read_dead_letters(run_dir)
    assert sorted(d["offset"] for d in letters) == sorted(r.json()["id"] for r in accepted)
    assert all("stopped before this accepted request was processed" in d["error"] for d in letters)
    assert sorted(json.loads(d["payload"])["n"] for d in letters) == [0, 1]


def test_streamfn_invoke_prints_the_answer(run_dir):
    p, _ = scoring_pipeline(run_dir)
    with serving(p) as run:
        done = subprocess.run([sys.executable, "-m", "streamfn.cli", "invoke", run.url("requests"),
                               "--data", '{"x": 21}'], capture_output=True, text=True, timeout=60)
        bad = subprocess.run([sys.executable, "-m", "streamfn.cli", "invoke", run.url("requests"),
                              "--data", "{oops"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"x": 21, "y": 42}
    assert bad.returncode == 1 and "malformed JSON" in bad.stdout


def test_a_stage_that_breaks_the_run_answers_500_not_an_empty_success(run_dir):
    p = sf.Pipeline("broken", run_dir=run_dir)
    requests = p.source(http.endpoint("/", port=0), name="requests")
    http.respond(requests.stage(lambda df: 42, name="wrong_type"))  # not a DataFrame: fatal
    with serving(p) as run, httpx.Client() as client:
        reply = client.post(run.url("requests"), json={"x": 1})
        run.thread.join(20)
    assert reply.status_code == 500
    assert reply.json()["error"] == "the pipeline failed while processing this request"
    assert isinstance(run.error, sf.StageError)


@settings(max_examples=60, deadline=None)
@given(requests=st.lists(st.lists(st.integers(-5, 5), max_size=4), min_size=1, max_size=12),
       cuts=st.lists(st.integers(1, 12), max_size=6))
def test_answers_do_not_depend_on_how_requests_are_batched(requests, cuts):
    """Every request gets exactly its own rows back, however requests share micro-batches."""
    source = http.endpoint("/", max_wait=0)
    source.responds = True
    lane = source.open("0", None)
    answers: dict[str, tuple[int, bytes]] = {}
    source.deliver = lambda pairs: answers.update({w: (a[0], a[1]) for w, a in pairs})  # no event loop here

    def stage(df: pl.DataFrame) -> pl.DataFrame:  # drops odd x, doubles the rest, reorders rows
        return df.filter(pl.col("x") % 2 == 0).with_columns(y=pl.col("x") * 2).sort("x", descending=True)

    sent = []
    for seq, xs in enumerate(requests):
        body = json.dumps([{"x": x} for x in xs]).encode()
        request = http.lane.Request(seq, f"r{seq}", "json", False, None, codec.decode_rows(body), 0.0,
                                    waiter=f"r{seq}")
        lane.offer(request)
        sent.append(request)
        if seq + 1 in cuts or seq == len(requests) - 1:
            frame = lane.next_batch(1000)
            if frame is not None:
                out = stage(frame)
                if out.height:
                    lane.collect(out)
            lane.commit(lane.position())
    for seq, xs in enumerate(requests):
        expected = sorted(({"x": x, "y": 2 * x} for x in xs if x % 2 == 0), key=lambda r: -r["x"])
        status, body = answers[f"r{seq}"]
        assert status == 200 and json.loads(body) == expected


@pytest.mark.parametrize("content_type,kind", [
    (None, "json"), ("application/json; charset=utf-8", "json"), ("application/vnd.api+json", "json"),
    ("Application/X-NDJSON", "ndjson"), ("text/csv", "csv"), ("application/vnd.apache.arrow.file", "arrow"),
])
def test_content_types_name_body_kinds(content_type, kind):
    assert codec.body_kind(content_type) == kind


def test_arrow_file_format_and_bad_arrow():
    sink = io.BytesIO()
    table = pa.table({"a": [1, 2]})
    with ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    assert codec.decode_frame(sink.getvalue(), codec.ARROW).to_dicts() == [{"a": 1}, {"a": 2}]
    with pytest.raises(codec.BodyError, match="malformed arrow body") as info:
        codec.decode_frame(b"not arrow", codec.ARROW)
    assert info.value.status == 400
