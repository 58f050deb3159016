"""/status, /healthz, /readyz on a running job, and `streamfn status URL`."""
from __future__ import annotations

import json
import socket
import threading

import polars as pl
import pytest

import streamfn as sf
from streamfn import observe
from streamfn.connectors import memory
from streamfn.observe.status import status_cli
from tests.observe.conftest import TickSource, get, get_json, wait_for


def test_status_of_a_running_job(live_run):
    status = live_run.wait_flowing()
    assert status["pipeline"] == "live" and status["health"] == "ok"
    assert [n["name"] for n in status["nodes"]] == ["ticks", "clean", "enrich", "out"]
    assert status["nodes"][1]["upstreams"] == ["ticks"] and status["nodes"][1]["engine"] == "cpu"
    assert {p["lane"] for p in status["partitions"]} == {"ticks[0]", "ticks[1]"}
    assert all(p["lag"] == 1_500 for p in status["partitions"])
    assert status["lag_total"] == 3_000

    def checkpointed() -> dict | None:
        s = get_json(live_run.url + "/status")
        return s if s["last_checkpoint"] and all(p["checkpoint_id"] for p in s["partitions"]) else None
    status = wait_for(checkpointed, what="a checkpoint in every lane")
    assert status["last_checkpoint"]["age_s"] >= 0
    first = {p["lane"]: p["position"] for p in status["partitions"]}
    moved = wait_for(lambda: all(p["position"] > first[p["lane"]]
                                 for p in get_json(live_run.url + "/status")["partitions"]),
                     what="positions to move")
    assert moved
    assert get(live_run.url + "/healthz")[0] == 200
    assert get(live_run.url + "/readyz")[0] == 200
    assert get(live_run.url + "/nope")[0] == 404


def test_status_after_the_run_says_finished(live_run):
    live_run.wait_flowing()
    live_run.source.done.set()
    live_run.thread.join(timeout=60)
    status = get_json(live_run.url + "/status")
    assert status["state"] == "finished" and status["health"] == "ok" and status["partitions"] == []
    assert status["nodes"][-1]["rows_out"] == live_run.summary.rows_out("out") > 0
    assert get(live_run.url + "/readyz")[0] == 503
    assert get(live_run.url + "/healthz")[0] == 200


def test_streamfn_status_prints_the_job(live_run, capsys):
    live_run.wait_flowing()
    assert status_cli(live_run.url) == 0
    out = capsys.readouterr().out
    assert out.startswith("live  running  health=ok")
    for name in ("ticks", "clean", "enrich", "out", "ticks[0]", "lag 1.5k"):
        assert name in out
    assert status_cli(live_run.url + "/status", as_json=True) == 0
    assert json.loads(capsys.readouterr().out)["pipeline"] == "live"


def test_streamfn_status_of_nothing_says_so(capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert status_cli(f"127.0.0.1:{port}") == 1
    assert "cannot read the status at 127.0.0.1:" in capsys.readouterr().err


def test_a_failed_run_is_unhealthy(run_dir):
    p = sf.Pipeline("broken", run_dir=run_dir)
    src = p.source(memory.source(pl.DataFrame({"x": [1, 2, 3]})))
    p.stage(src, name="wrong")(lambda df: "not a frame").sink(memory.sink())
    with observe.start(p, metrics_port=0) as obs:
        try:
            p.run(until_idle=True, handle_signals=False)
        except sf.StreamfnError:
            pass
        status = get_json(obs.url + "/status")
        assert status["state"] == "failed" and status["health"] == "failed"
        assert "stage 'wrong'" in status["error"]
        assert get(obs.url + "/healthz")[0] == 503
        assert status_cli(obs.url) == 1


def test_observe_options_of_pipeline_run_serve_status(run_dir):
    source = TickSource(("0",), rows=100, every_s=0.01)
    p = sf.Pipeline("opts", run_dir=run_dir)
    p.source(source).sink(memory.sink())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    thread = threading.Thread(target=p.run, kwargs={"handle_signals": False,
                                                    "observe": {"metrics_port": port, "quiet": True}})
    thread.start()
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: _up(url), what="the status server of Pipeline.run(observe=...)")
        assert get_json(url + "/status")["pipeline"] == "opts"
    finally:
        source.done.set()
        thread.join(timeout=60)
    assert not _up(url)  # the run's own server closes with the run


def _up(url: str) -> bool:
    try:
        return get(url + "/healthz")[0] == 200
    except OSError:
        return False


def test_another_server_can_answer_the_same_routes(live_run):
    from streamfn.observe import current
    from streamfn.observe.status import respond

    live_run.wait_flowing()
    observation = current("live")
    assert observation is live_run.observation
    code, ctype, body = respond(observation, "/status?x=1")
    assert code == 200 and ctype == "application/json" and json.loads(body)["pipeline"] == "live"
    assert respond(observation, "/metrics")[1].startswith("text/plain; version=0.0.4")
    assert respond(observation, "/")[2].startswith(b"<!doctype html>")
    assert respond(observation, "/orders") is None  # not ours: the trigger's own route
    assert current("no-such-pipeline") is None


def test_a_taken_port_is_a_clear_error(run_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        p = sf.Pipeline("clash", run_dir=run_dir)
        p.source(memory.source(pl.DataFrame({"x": [1]}))).sink(memory.sink())
        with pytest.raises(sf.ConfigError, match=f"cannot serve metrics and status on 127.0.0.1:{port}: "
                                                 ".*; pick another --metrics-port"):
            observe.start(p, metrics_port=port)
