"""Fuzzed bad input beyond data files: HTTP trigger bodies, spec files, notebook files.

Never a crash, never a traceback: a 4xx answer with a dead letter, or a one-line ConfigError.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import polars as pl
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from streamfn.connectors import http

import streamfn as sf
from streamfn.errors import StreamfnError
from streamfn.export import export_pipeline
from streamfn.loader import load_pipeline
from streamfn.notebook import read_notebook
from streamfn.spec import load_spec, read_spec
from tests.helpers import read_dead_letters
from tests.servers.http import Serving, serving

pytestmark = pytest.mark.integration

DATA = Path(__file__).parent.parent / "data" / "export"
CONTENT_TYPES = ["application/json", "application/x-ndjson", "text/csv", "application/vnd.apache.arrow.stream",
                 "application/vnd.apache.arrow.file", "text/plain", "", "application/json; charset=utf-8"]
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner,
                                                                                       max_size=4), max_leaves=12)
bodies = st.one_of(st.binary(max_size=200), json_values.map(lambda v: json.dumps(v).encode()),
                   st.lists(st.dictionaries(st.sampled_from(["x", "y", ""]), json_values, max_size=3), max_size=4)
                   .map(lambda v: json.dumps(v).encode()),
                   st.text(max_size=60).map(lambda t: f"x\n{t}".encode()))
COUNTS: dict[str, int] = {"requests": 0, "answered_4xx": 0, "answered_2xx": 0}


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[tuple[Serving, str]]:
    """One endpoint with a schema for every fuzzed request; at the end, every 4xx is a dead letter."""
    run_dir = str(tmp_path_factory.mktemp("fuzz") / "run")
    p = sf.Pipeline("fuzz", run_dir=run_dir)
    requests = p.source(http.endpoint("/in", port=0, schema={"x": pl.Int64}, max_body_bytes=150), name="requests")

    @p.stage(requests)
    def double(df: pl.DataFrame) -> pl.DataFrame:
        return df.with_columns(y=pl.col("x") * 2)

    http.respond(double)
    ids: list[str] = []
    with serving(p) as run:
        yield run, ids  # type: ignore[misc]
    assert run.error is None, run.error
    lettered = {d["offset"] for d in read_dead_letters(run_dir)}
    missing = [i for i in ids if i not in lettered]
    assert not missing, f"{len(missing)} rejected requests have no dead letter: {missing[:5]}"
    print(f"\nFUZZ HTTP {json.dumps(COUNTS)} dead letters {len(lettered)}")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=bodies, content_type=st.sampled_from(CONTENT_TYPES))
def test_any_body_gets_an_answer_or_a_4xx_never_a_500(server, body, content_type):
    run, ids = server
    headers = {"content-type": content_type} if content_type else {}
    reply = httpx.post(run.url("requests"), content=body, headers=headers, timeout=30)
    COUNTS["requests"] += 1
    assert reply.status_code in (200, 400, 413, 415, 422), (reply.status_code, reply.text)
    assert "Traceback" not in reply.text
    if reply.status_code >= 400:
        COUNTS["answered_4xx"] += 1
        assert reply.json()["error"]
        if reply.status_code != 413:  # too big: refused before it was read, so nothing to keep
            ids.append(reply.json()["id"])
    else:
        COUNTS["answered_2xx"] += 1


@pytest.fixture(scope="module")
def good_spec(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("spec")
    path = str(DATA / "http_pipe.py")
    files = export_pipeline(load_pipeline(path), path, str(out), settings={})
    return yaml.safe_load(Path(next(f for f in files if f.endswith("function.yaml"))).read_text())


def _mutate(doc, path: list, value):
    if not path or not isinstance(doc, dict) or not doc:
        return value
    key = sorted(doc, key=str)[path[0] % len(doc)]
    return {**doc, key: _mutate(doc[key], path[1:], value)}


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode)),
       path=st.lists(st.integers(0, 50), max_size=4), value=json_values, mode=st.sampled_from(["raw", "mutate"]))
def test_a_broken_spec_file_is_a_config_error(tmp_path, good_spec, raw, path, value, mode):
    target = tmp_path / "function.yaml"
    data = raw if mode == "raw" else yaml.safe_dump(_mutate(good_spec, path, value)).encode()
    target.write_bytes(data)
    for read in (read_spec, load_spec):
        try:
            read(str(target))
        except StreamfnError as exc:
            assert "\n" not in str(exc).strip() or len(str(exc)) < 2000, str(exc)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.one_of(st.binary(max_size=200), json_values.map(lambda v: json.dumps(v).encode()),
                     st.lists(st.fixed_dictionaries({"cell_type": st.sampled_from(["code", "markdown", "raw", 3]),
                                                     "source": st.one_of(st.text(max_size=40),
                                                                         st.lists(st.text(max_size=20), max_size=3),
                                                                         json_values)}), max_size=3)
                     .map(lambda cells: json.dumps({"cells": cells, "nbformat": 4, "metadata": {}}).encode())))
def test_a_broken_notebook_is_a_config_error(tmp_path, raw):
    target = tmp_path / "job.ipynb"
    target.write_bytes(raw)
    try:
        read_notebook(str(target))
    except StreamfnError:
        pass
