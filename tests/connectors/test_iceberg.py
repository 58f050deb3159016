"""Iceberg sink and source with a SQL (SQLite) catalog, on a local warehouse and on S3 (moto)."""
from __future__ import annotations

import os

import polars as pl
import pytest
from polars.testing import assert_frame_equal

import streamfn as sf
from streamfn.connectors import iceberg, memory
from streamfn.connectors._exactly_once import SchemaMismatch, TargetUnavailable
from streamfn.errors import ConfigError
from tests.connectors import _tables_job as job
from tests.connectors.tables_common import run_killed_then_restarted, sort_frame, ticks_file, typed_frame

pytestmark = pytest.mark.integration


def write(name: str, run_dir: str, data, sink, batch_rows: int = 1000) -> None:
    p = sf.Pipeline(name, run_dir=run_dir, batch_rows=batch_rows, threads=2)
    p.source(memory.source(data)).sink(sink)
    p.run(until_idle=True)


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path) -> dict:
    """Catalog arguments: a SQLite catalog file, with its warehouse local or on S3."""
    catalog = str(tmp_path / "catalog.db")
    if request.param == "local":
        return {"catalog": catalog}
    bucket = request.getfixturevalue("tables_bucket")
    return {"catalog": catalog, "warehouse": f"s3://{bucket}/wh"}


def read(where: dict, identifier: str, run_dir: str, snapshot_id: int | None = None) -> pl.DataFrame:
    p = sf.Pipeline("reader", run_dir=run_dir + "-read")
    out = memory.sink()
    p.source(iceberg.table(where["catalog"], identifier, warehouse=where.get("warehouse"),
                           snapshot_id=snapshot_id)).sink(out)
    p.run(until_idle=True)
    return out.frame()


def sink(where: dict, identifier: str, **kw) -> iceberg.IcebergTable:
    return iceberg.table(where["catalog"], identifier, warehouse=where.get("warehouse"), **kw)


def test_every_type_round_trips(where, run_dir):
    df = typed_frame()
    write("types", run_dir, df, sink(where, "ns.types"), batch_rows=17)
    back = read(where, "ns.types", run_dir).sort("id")
    assert_frame_equal(back, df, check_dtypes=False)
    assert back.schema["at"] == pl.Datetime("us", "UTC")
    assert back.schema["amount"] == pl.Decimal(18, 4)


def test_append_is_exactly_once_and_records_progress(where, run_dir):
    data = {str(k): pl.DataFrame({"k": [k] * 300, "x": list(range(300))}) for k in range(2)}
    write("again", run_dir, data, sink(where, "ns.again"), batch_rows=64)
    write("again", run_dir, data, sink(where, "ns.again"), batch_rows=100)
    assert read(where, "ns.again", run_dir).height == 600
    tbl = iceberg.load_catalog(where["catalog"], warehouse=where.get("warehouse")).load_table("ns.again")
    apps = {s.summary.additional_properties.get("streamfn.app") for s in tbl.metadata.snapshots}
    assert apps == {"again/memory[0]", "again/memory[1]"}


def test_rows_written_behind_the_lanes_land_once_per_checkpoint(tmp_path, run_dir):
    where = {"catalog": str(tmp_path / "c.db")}
    data = {str(k): pl.DataFrame({"k": [k] * 3000, "x": list(range(3000))}) for k in range(2)}
    write("behind", run_dir, data, sink(where, "ns.behind", file_bytes=4096), batch_rows=250)
    catalog = iceberg.load_catalog(where["catalog"])
    snapshots = len(catalog.load_table("ns.behind").metadata.snapshots)
    write("behind", run_dir, data, sink(where, "ns.behind", file_bytes=4096), batch_rows=250)  # a replay
    tbl = catalog.load_table("ns.behind")
    assert len(tbl.metadata.snapshots) == snapshots  # snapshots only at checkpoints; none from the replay
    assert len(tbl.inspect.files()) > 2 * snapshots  # several data files in each snapshot
    back = read(where, "ns.behind", run_dir).sort("k", "x")
    assert_frame_equal(back, pl.concat(data.values()).sort("k", "x"), check_dtypes=False)


def test_upsert_updates_rows_by_key(tmp_path, run_dir):
    where = {"catalog": str(tmp_path / "c.db")}
    write("u1", run_dir, pl.DataFrame({"id": [1, 2, 3], "v": ["a", "b", "c"]}),
          sink(where, "ns.up", mode="upsert", key=["id"]))
    write("u2", run_dir, pl.DataFrame({"id": [3, 4, 4], "v": ["C", "d", "D"]}),
          sink(where, "ns.up", mode="upsert", key=["id"]))
    back = read(where, "ns.up", run_dir).sort("id")
    assert back.to_dict(as_series=False) == {"id": [1, 2, 3, 4], "v": ["a", "b", "C", "D"]}


def test_upsert_with_an_added_column_updates_rows_by_key(tmp_path, run_dir):
    where = {"catalog": str(tmp_path / "c.db")}
    write("ua1", run_dir, pl.DataFrame({"id": [1, 2, 3], "v": ["a", "b", "c"]}),
          sink(where, "ns.upn", mode="upsert", key=["id"]))
    write("ua2", run_dir, pl.DataFrame({"id": [3, 4, 4], "v": ["C", "d", "D"], "n": [30, 40, 41]}),
          sink(where, "ns.upn", mode="upsert", key=["id"]))
    back = read(where, "ns.upn", run_dir).sort("id")
    assert back.to_dict(as_series=False) == {"id": [1, 2, 3, 4], "v": ["a", "b", "C", "D"],
                                             "n": [None, None, 30, 41]}


def test_added_columns_evolve_the_schema_and_old_snapshots_stay_readable(tmp_path, run_dir):
    where = {"catalog": str(tmp_path / "c.db")}
    write("e1", run_dir, pl.DataFrame({"id": [1]}), sink(where, "ns.evo"))
    first = iceberg.load_catalog(where["catalog"]).load_table("ns.evo").current_snapshot().snapshot_id
    write("e2", run_dir, pl.DataFrame({"id": [2], "note": ["new"]}), sink(where, "ns.evo"))
    back = read(where, "ns.evo", run_dir).sort("id")
    assert back.to_dict(as_series=False) == {"id": [1, 2], "note": [None, "new"]}
    assert read(where, "ns.evo", run_dir, snapshot_id=first)["id"].to_list() == [1]


def test_schema_mismatch_is_a_clear_error(tmp_path, run_dir):
    where = {"catalog": str(tmp_path / "c.db")}
    write("s1", run_dir, pl.DataFrame({"id": [1], "v": ["a"]}), sink(where, "ns.s"))
    with pytest.raises(SchemaMismatch, match=r"column v is large_string, the batch gives double"):
        write("s2", run_dir, pl.DataFrame({"id": [2], "v": [1.5]}), sink(where, "ns.s"))
    with pytest.raises(SchemaMismatch, match=r"adds columns \['w'\]"):
        write("s3", run_dir, pl.DataFrame({"id": [2], "w": [1]}), sink(where, "ns.s", evolve_schema=False))


def test_unreachable_warehouse_fails_clearly_after_bounded_retries(tmp_path, run_dir, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    for key, value in {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y", "AWS_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    where = {"catalog": str(tmp_path / "c.db"), "warehouse": "s3://nowhere/wh"}
    with pytest.raises(TargetUnavailable, match="failed after 2 attempts"):
        write("down", run_dir, pl.DataFrame({"x": [1]}), sink(where, "ns.down", retries=1, retry_backoff_s=0.05))


def test_config_errors():
    with pytest.raises(ConfigError, match="needs key"):
        iceberg.table(None, "ns.t", mode="upsert")
    with pytest.raises(ConfigError, match="namespace.table"):
        iceberg.table(None, "t")


def test_kill_9_in_the_middle_then_restart_gives_each_row_once(tmp_path, tables_bucket):
    source = ticks_file(str(tmp_path / "ticks.jsonl"), 60_000)
    where = {"catalog": str(tmp_path / "kill.db"), "warehouse": f"s3://{tables_bucket}/wh"}
    env = {k: os.environ[k] for k in os.environ if k.startswith("AWS_")}
    # small data files: many are written behind the lanes, some never committed before the kill
    run_killed_then_restarted("iceberg", source, str(tmp_path),
                              {"catalog": where["catalog"], "identifier": "ns.ticks",
                               "warehouse": where["warehouse"], "file_bytes": 32 << 10}, env=env)
    want = job.expected(source)
    back = read(where, "ns.ticks", str(tmp_path / "r"))
    assert back.height == want.height
    assert_frame_equal(sort_frame(back, want.columns), sort_frame(want, want.columns))


def test_table_source_passes_the_contract_kit(tmp_path, run_dir):
    from streamfn.sourcekit import check_source

    where = {"catalog": str(tmp_path / "c.db")}
    write("kit", run_dir, pl.DataFrame({"x": list(range(40))}), sink(where, "ns.kit"))
    rows = check_source(iceberg.table(where["catalog"], "ns.kit"), expected_rows=40)
    assert sorted(rows["x"].to_list()) == list(range(40))


def test_kill_9_in_a_kafka_fed_run_then_restart_gives_each_row_once(tmp_path, kafka_tansu):
    import json

    from tests.connectors.tables_common import produce_ticks

    source = ticks_file(str(tmp_path / "ticks.jsonl"), 40_000)
    topic = kafka_tansu.topic_name("ticks")
    produce_ticks(kafka_tansu.bootstrap, topic, source)
    where = {"catalog": str(tmp_path / "kafka.db")}
    env = {"TABLES_JOB_SETTINGS": json.dumps(kafka_tansu.run_settings())}
    run_killed_then_restarted("iceberg", f"kafka:{topic}", str(tmp_path),
                              {"catalog": where["catalog"], "identifier": "ns.kticks"}, env=env,
                              kill_after_batches=6)
    want = job.expected(source)
    back = read(where, "ns.kticks", str(tmp_path / "r"))
    assert back.height == want.height
    assert_frame_equal(sort_frame(back, want.columns), sort_frame(want, want.columns))


def test_warehouse_down_for_a_while_then_back(tables_s3, tables_bucket, tmp_path, run_dir, monkeypatch):
    import threading

    from tests.connectors.tables_common import FlakyProxy

    proxy = FlakyProxy(int(tables_s3.rsplit(":", 1)[1]))
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    where = {"catalog": str(tmp_path / "c.db"), "warehouse": f"s3://{tables_bucket}/flaky"}
    write("flaky0", run_dir, pl.DataFrame({"x": [-1]}), sink(where, "ns.flaky"))
    proxy.down()
    restarter = threading.Timer(1.0, proxy.up)
    restarter.start()
    try:
        write("flaky", run_dir, pl.DataFrame({"x": list(range(100))}),
              sink(where, "ns.flaky", retries=8, retry_backoff_s=0.2))
    finally:
        restarter.join()
    try:
        assert sorted(read(where, "ns.flaky", run_dir)["x"].to_list()) == [-1, *range(100)]
    finally:
        proxy.down()
