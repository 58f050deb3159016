"""The Iceberg sink and source through a real REST catalog (SeaweedFS, tests/servers/iceberg_rest.py)."""
from __future__ import annotations

import uuid

import polars as pl
import pytest
from polars.testing import assert_frame_equal

import streamfn as sf
from streamfn.connectors import iceberg, memory
from tests.connectors import _tables_job as job
from tests.connectors.tables_common import run_killed_then_restarted, sort_frame, ticks_file

pytestmark = pytest.mark.integration


def _namespace() -> str:
    return f"ns_{uuid.uuid4().hex[:8]}"  # one catalog for the session: each test its own namespace


def write(name: str, run_dir: str, data, sink, batch_rows: int = 1000) -> None:
    p = sf.Pipeline(name, run_dir=run_dir, batch_rows=batch_rows, threads=2)
    p.source(memory.source(data)).sink(sink)
    p.run(until_idle=True)


def read(catalog, identifier: str, run_dir: str, snapshot_id: int | None = None) -> pl.DataFrame:
    p = sf.Pipeline("reader", run_dir=run_dir + "-read")
    out = memory.sink()
    p.source(iceberg.table(catalog, identifier, snapshot_id=snapshot_id)).sink(out)
    p.run(until_idle=True)
    return out.frame()


def test_append_through_the_rest_catalog_is_exactly_once(iceberg_rest, run_dir):
    catalog, ident = iceberg_rest.catalog(), f"{_namespace()}.again"
    data = {str(k): pl.DataFrame({"k": [k] * 300, "x": list(range(300))}) for k in range(2)}
    write("again", run_dir, data, iceberg.table(catalog, ident), batch_rows=64)
    first = iceberg.load_catalog(catalog).load_table(ident).current_snapshot().snapshot_id
    write("again", run_dir, data, iceberg.table(catalog, ident), batch_rows=100)  # a replay: nothing new
    tbl = iceberg.load_catalog(catalog).load_table(ident)
    assert tbl.current_snapshot().snapshot_id == first
    summaries = [s.summary.additional_properties for s in tbl.metadata.snapshots]
    assert {s["streamfn.app"] for s in summaries} == {"again/memory[0]", "again/memory[1]"}
    assert {s["streamfn.high-offset"] for s in summaries} == {"299"}
    back = read(catalog, ident, run_dir)
    assert back.height == 600
    assert_frame_equal(back.sort("k", "x"), pl.concat(data.values()).sort("k", "x"), check_dtypes=False)


def test_upsert_and_added_columns_through_the_rest_catalog(iceberg_rest, run_dir):
    catalog, ident = iceberg_rest.catalog(), f"{_namespace()}.up"
    write("u1", run_dir, pl.DataFrame({"id": [1, 2, 3], "v": ["a", "b", "c"]}),
          iceberg.table(catalog, ident, mode="upsert", key=["id"]))
    write("u2", run_dir, pl.DataFrame({"id": [3, 4, 4], "v": ["C", "d", "D"], "n": [30, 40, 41]}),
          iceberg.table(catalog, ident, mode="upsert", key=["id"]))
    back = read(catalog, ident, run_dir).sort("id")
    assert back.to_dict(as_series=False) == {"id": [1, 2, 3, 4], "v": ["a", "b", "C", "D"],
                                             "n": [None, None, 30, 41]}


def test_kill_9_then_restart_through_the_rest_catalog_gives_each_row_once(iceberg_rest, tmp_path):
    # the child processes find the catalog by URL and their credentials in the environment
    source = ticks_file(str(tmp_path / "ticks.jsonl"), 60_000)
    ident = f"{_namespace()}.ticks"
    run_killed_then_restarted("iceberg", source, str(tmp_path),
                              {"catalog": iceberg_rest.uri, "identifier": ident,
                               "warehouse": iceberg_rest.warehouse}, env=iceberg_rest.env())
    want = job.expected(source)
    back = read(iceberg_rest.catalog(), ident, str(tmp_path / "r"))
    assert back.height == want.height
    assert_frame_equal(sort_frame(back, want.columns), sort_frame(want, want.columns))
