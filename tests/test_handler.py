"""The handler model: handler(context, event) called directly, per record, and served over HTTP."""
from __future__ import annotations

import json
import logging

import httpx
import polars as pl
import pytest

import streamfn as sf
from streamfn.connectors import memory
from streamfn.errors import LoadError
from streamfn.handler import as_answer, is_handler, pipeline_for_handler, wrap
from streamfn.testing import Context, Event, Response, call
from tests.helpers import read_dead_letters
from tests.servers.http import serving


def init_context(context):
    context.user_data.greeting = "hello"
    context.user_data.inits = context.user_data.__dict__.get("inits", 0) + 1


def greet(context, event):
    context.logger.info_with("greeting", who=event.body.get("name"), path=event.path)
    return {"text": f"{context.user_data.greeting} {event.body['name']}"}


def test_testing_context_and_event_call_a_handler_with_logs_shown(capsys):
    context = Context()
    init_context(context)
    answer = greet(context, Event(body={"name": "ada"}, path="/greet"))
    assert answer == {"text": "hello ada"}
    shown = capsys.readouterr().out
    assert "info    greeting  who=ada path=/greet" in shown
    assert context.records[0].who == "ada"


def test_event_takes_nuclio_arguments():
    event = Event(body=b"raw", content_type="text/plain", trigger="kafka", _id="7",
                  headers={"X-Trace": "abc"}, method="PUT", path="/p", fields={"a": "1"})
    assert (event.id, event._id, event.trigger.kind, event.size) == ("7", "7", "kafka", 3)
    assert event.get_header("x-trace") == "abc" and event.timestamp.tzinfo is not None
    assert Event().trigger.kind == "http" and Event().headers == {}


def test_call_runs_init_context_once_per_context():
    context = Context(stream=None)
    assert call(greet, Event(body={"name": "x"}), context=context, init_context=init_context)["text"] == "hello x"
    call(greet, Event(body={"name": "y"}), context=context, init_context=init_context)
    assert context.user_data.inits == 1


def test_logger_has_nuclio_methods(capsys):
    context = Context()
    log = context.logger
    log.debug("d")
    log.warn("w %s", 1)
    log.error_with("e", code=3, message="clash")  # a field named like a LogRecord attribute
    out = capsys.readouterr().out
    assert "debug   d" in out and "warning w 1" in out and "code=3" in out and "field_message=clash" in out


@pytest.mark.parametrize("value,expected", [
    ("hi", (200, b"hi", "text/plain", {})),
    (b"\x00", (200, b"\x00", "application/octet-stream", {})),
    ({"a": 1}, (200, b'{"a": 1}', "application/json", {})),
    ([1, 2], (200, b"[1, 2]", "application/json", {})),
    ((201, "made"), (201, b"made", "text/plain", {})),
    (None, (200, b"", "text/plain", {})),
    (Response(body="x", status_code=202, content_type="text/csv", headers={"h": "v"}),
     (202, b"x", "text/csv", {"h": "v"})),
    (pl.DataFrame({"a": [1]}), (200, b'[{"a": 1}]', "application/json", {})),
])
def test_return_values_become_answers_as_in_nuclio(value, expected):
    assert as_answer(value) == expected


def test_is_handler_recognises_the_shape():
    assert is_handler(greet)
    assert not is_handler(lambda df: df)
    assert not is_handler(lambda df, state: df)


def test_handler_per_record_in_a_pipeline_dead_letters_a_raising_row(run_dir):
    calls = []

    def handler(context, event):
        calls.append(event.body["n"])
        if event.body["n"] == 2:
            raise ValueError("two is bad")
        if event.body["n"] == 3:
            return None  # nothing for this record
        return [{"n": event.body["n"], "double": event.body["n"] * 2}]

    p = sf.Pipeline("per_record", run_dir=run_dir)
    rows = p.source(memory.source([{"n": i} for i in range(5)]))
    out = memory.sink()
    rows.stage(wrap(handler)).sink(out)
    summary = p.run(until_idle=True, handle_signals=False)
    assert out.frame().to_dicts() == [{"n": 0, "double": 0}, {"n": 1, "double": 2}, {"n": 4, "double": 8}]
    assert calls == [0, 1, 2, 3, 4]  # once per record: no retry of the rows that worked
    letters = read_dead_letters(run_dir)
    assert len(letters) == 1 and letters[0]["error"] == "ValueError: two is bad"
    assert json.loads(letters[0]["payload"]) == {"n": 2} and letters[0]["stage"] == "handler"
    assert summary.dead_letters == 1


def test_wrapped_handler_can_be_called_on_a_frame_in_a_notebook():
    stage = wrap(lambda context, event: {"v": event.body["v"] + 1}, name="inc")
    assert stage(pl.DataFrame({"v": [1, 2]})).to_dicts() == [{"v": 2}, {"v": 3}]


def nuclio_handler(context, event):
    context.logger.info_with("request", method=event.method, path=event.path)
    context.user_data.calls += 1
    if event.path == "/boom":
        raise RuntimeError("database password is hunter2")
    if event.path == "/tuple":
        return 418, "teapot"
    if event.path == "/response":
        return context.Response(body={"ok": True}, status_code=201, headers={"x-fn": "yes"})
    if event.path == "/calls":
        return str(context.user_data.calls)
    if isinstance(event.body, bytes):
        return event.body[::-1]
    return {"got": event.body, "method": event.method, "ct": event.content_type, "q": event.fields}


def nuclio_init(context):
    context.user_data.calls = 0


def test_a_file_with_only_a_handler_is_served_over_http(run_dir, caplog):
    module = {"handler": nuclio_handler, "init_context": nuclio_init, "__file__": "/tmp/my-fn.py"}
    p = pipeline_for_handler(module, port=0, host="127.0.0.1")
    p.run_dir = run_dir
    assert p.name == "my-fn"
    with caplog.at_level(logging.INFO, logger="streamfn.handler"), serving(p) as run, httpx.Client() as client:
        base = run.url("http").rstrip("/")
        as_json = client.post(base + "/score?lang=en", json={"text": "hi"})
        as_bytes = client.post(base + "/bin", content=b"\x01\x02\x03",
                               headers={"content-type": "application/octet-stream"})
        teapot = client.post(base + "/tuple")
        created = client.put(base + "/response")
        boom = client.post(base + "/boom")
        calls = client.get(base + "/calls")
    assert as_json.json() == {"got": {"text": "hi"}, "method": "POST", "ct": "application/json",
                              "q": {"lang": "en"}}
    assert as_bytes.content == b"\x03\x02\x01"
    assert as_bytes.headers["content-type"] == "application/octet-stream"
    assert (teapot.status_code, teapot.text) == (418, "teapot")
    assert (created.status_code, created.json(), created.headers["x-fn"]) == (201, {"ok": True}, "yes")
    assert boom.status_code == 500 and boom.json()["error"] == "handler raised RuntimeError"
    assert "hunter2" not in boom.text and "Traceback" not in boom.text
    assert calls.text == "6"  # init_context ran once; user_data kept across requests
    logged = [r for r in caplog.records if r.getMessage() == "request"]
    assert {r.path for r in logged} >= {"/score", "/bin", "/boom"} and logged[0].method == "POST"
    failed = [r for r in caplog.records if r.getMessage() == "handler raised"]
    assert failed and failed[0].exc_info is not None  # the traceback goes to the log
    assert read_dead_letters(run_dir)[0]["error"] == "RuntimeError: database password is hunter2"


def test_pipeline_for_handler_needs_a_handler():
    with pytest.raises(LoadError, match="no handler"):
        pipeline_for_handler({"x": 1}, port=0, host="127.0.0.1")


def test_a_handler_decorated_as_a_stage_runs_per_row_and_stays_callable(run_dir):
    p = sf.Pipeline("decorated", run_dir=run_dir)
    rows = p.source(memory.source([{"name": "ada"}, {"name": "bob"}]))

    @p.stage(rows)
    def handler(context, event):  # init_context of this module runs first, as in Nuclio
        return {"text": f"{context.user_data.greeting} {event.body['name']}"}

    out = memory.sink()
    handler.sink(out)
    p.run(until_idle=True, handle_signals=False)
    assert out.frame()["text"].to_list() == ["hello ada", "hello bob"]
    context = Context()
    init_context(context)
    assert handler(context, Event(body={"name": "cy"})) == {"text": "hello cy"}


def test_a_stateful_handler_keeps_context_state_per_key(run_dir):
    p = sf.Pipeline("counts", run_dir=run_dir)
    clicks = p.source(memory.source([pl.DataFrame({"user": ["a", "b"]}), pl.DataFrame({"user": ["a"]})]))

    @p.stage(clicks, state=sf.table(key="user"))
    def handler(context, event):
        user = event.body["user"]
        seen = context.state.get(user, {"user": user, "n": 0})
        context.state.put({"user": user, "n": seen["n"] + 1})
        return {"user": user, "n": seen["n"] + 1}

    out = memory.sink()
    handler.sink(out)
    p.run(until_idle=True, handle_signals=False)
    assert out.frame().to_dicts() == [{"user": "a", "n": 1}, {"user": "b", "n": 1}, {"user": "a", "n": 2}]
