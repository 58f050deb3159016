"""Delta Lake sink and source, on a local directory and on S3 (moto)."""
from __future__ import annotations

import json

import deltalake
import polars as pl
import pytest
from polars.testing import assert_frame_equal

import streamfn as sf
from streamfn.connectors import delta, memory
from streamfn.connectors._exactly_once import SchemaMismatch
from streamfn.errors import ConfigError
from tests.connectors import _tables_job as job
from tests.connectors.tables_common import run_killed_then_restarted, sort_frame, ticks_file, typed_frame

pytestmark = pytest.mark.integration


def write(name: str, run_dir: str, data, sink, batch_rows: int = 1000) -> None:
    p = sf.Pipeline(name, run_dir=run_dir, batch_rows=batch_rows, threads=2)
    p.source(memory.source(data)).sink(sink)
    p.run(until_idle=True)


def read(url: str, run_dir: str, version: int | None = None) -> pl.DataFrame:
    p = sf.Pipeline("reader", run_dir=run_dir + "-read")
    out = memory.sink()
    p.source(delta.table(url, version=version)).sink(out)
    p.run(until_idle=True)
    return out.frame()


@pytest.fixture(params=["local", "s3"])
def url(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "table")
    bucket = request.getfixturevalue("tables_bucket")
    return f"s3://{bucket}/lake/table"


def test_every_type_round_trips(url, run_dir):
    df = typed_frame()
    write("types", run_dir, df, delta.table(url), batch_rows=17)
    back = read(url, run_dir).sort("id")
    assert_frame_equal(back, df, check_dtypes=False)
    assert back.schema["at"] == pl.Datetime("us", "UTC")
    assert back.schema["amount"] == pl.Decimal(18, 4)


def test_append_is_exactly_once_when_the_source_is_read_again(url, run_dir):
    data = {str(k): pl.DataFrame({"k": [k] * 300, "x": list(range(300))}) for k in range(2)}
    write("again", run_dir, data, delta.table(url), batch_rows=64)
    write("again", run_dir, data, delta.table(url), batch_rows=100)
    assert read(url, run_dir).height == 600
    dt = deltalake.DeltaTable(url, storage_options=delta.storage_options_for(url))
    assert dt.transaction_version("again/memory[0]") == 299


def test_merge_updates_rows_by_key(tmp_path, run_dir):
    url = str(tmp_path / "m")
    write("m1", run_dir, pl.DataFrame({"id": [1, 2, 3], "v": ["a", "b", "c"]}),
          delta.table(url, mode="merge", key=["id"]))
    write("m2", run_dir, pl.DataFrame({"id": [3, 4, 4], "v": ["C", "d", "D"]}),
          delta.table(url, mode="merge", key=["id"]))
    back = read(url, run_dir).sort("id")
    assert back.to_dict(as_series=False) == {"id": [1, 2, 3, 4], "v": ["a", "b", "C", "D"]}


def test_partitioned_table_and_source_from_a_version(tmp_path, run_dir):
    url = str(tmp_path / "p")
    write("p1", run_dir, pl.DataFrame({"sym": ["a", "b"], "x": [1, 2]}), delta.table(url, partition_by=["sym"]))
    write("p2", run_dir, pl.DataFrame({"sym": ["a"], "x": [3]}), delta.table(url, partition_by=["sym"]))
    assert sorted(read(url, run_dir, version=0)["x"].to_list()) == [1, 2]
    assert sorted(read(url, run_dir)["x"].to_list()) == [1, 2, 3]


def test_schema_mismatch_is_a_clear_error(tmp_path, run_dir):
    url = str(tmp_path / "s")
    write("s1", run_dir, pl.DataFrame({"id": [1], "v": ["a"]}), delta.table(url))
    with pytest.raises(SchemaMismatch, match=r"does not fit the table"):
        write("s2", run_dir, pl.DataFrame({"id": [2], "w": [1.5]}), delta.table(url))
    write("s3", run_dir, pl.DataFrame({"id": [2], "v": ["b"], "w": [1.5]}), delta.table(url, schema_mode="merge"))
    assert read(url, run_dir).sort("id")["w"].to_list() == [None, 1.5]


def test_optimize_compacts_and_vacuums(tmp_path, run_dir, capsys):
    url = str(tmp_path / "o")
    for i in range(4):
        write(f"o{i}", run_dir, pl.DataFrame({"x": [i]}), delta.table(url))
    assert delta.optimize_cli(url, vacuum=True) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["files_removed"] == 4 and result["files_added"] == 1
    assert sorted(read(url, run_dir)["x"].to_list()) == [0, 1, 2, 3]
    assert delta.optimize_cli(str(tmp_path / "none"), vacuum=False) == 1


def test_unreachable_store_fails_clearly_after_bounded_retries(run_dir):
    from streamfn.connectors._exactly_once import TargetUnavailable

    sink = delta.table("s3://nowhere/t", retries=1, retry_backoff_s=0.05,
                       storage_options={"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ALLOW_HTTP": "true",
                                        "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y",
                                        "max_retries": "1", "retry_timeout": "2s"})
    with pytest.raises(TargetUnavailable, match="failed after 2 attempts"):
        write("down", run_dir, pl.DataFrame({"x": [1]}), sink)


def test_config_errors():
    with pytest.raises(ConfigError, match="needs key"):
        delta.table("/tmp/x", mode="merge")


def test_kill_9_in_the_middle_then_restart_gives_each_row_once(tmp_path, tables_bucket):
    import os

    source = ticks_file(str(tmp_path / "ticks.jsonl"), 60_000)
    url = f"s3://{tables_bucket}/kill/ticks"
    env = {k: os.environ[k] for k in os.environ if k.startswith("AWS_")}
    run_killed_then_restarted("delta", source, str(tmp_path), {"url": url}, env=env)
    want = job.expected(source)
    back = read(url, str(tmp_path / "r"))
    assert back.height == want.height
    assert_frame_equal(sort_frame(back, want.columns), sort_frame(want, want.columns))


def test_table_source_passes_the_contract_kit(tmp_path, run_dir):
    from streamfn.sourcekit import check_source

    url = str(tmp_path / "kit")
    write("kit", run_dir, pl.DataFrame({"x": list(range(40))}), delta.table(url))
    assert sorted(check_source(delta.table(url), expected_rows=40)["x"].to_list()) == list(range(40))


def test_kill_9_in_a_kafka_fed_run_then_restart_gives_each_row_once(tmp_path, kafka_tansu):
    import json

    from tests.connectors.tables_common import produce_ticks

    source = ticks_file(str(tmp_path / "ticks.jsonl"), 40_000)
    topic = kafka_tansu.topic_name("ticks")
    produce_ticks(kafka_tansu.bootstrap, topic, source)
    url = str(tmp_path / "kafka-ticks")
    env = {"TABLES_JOB_SETTINGS": json.dumps(kafka_tansu.run_settings())}
    run_killed_then_restarted("delta", f"kafka:{topic}", str(tmp_path), {"url": url}, env=env,
                              kill_after_batches=6)
    want = job.expected(source)
    back = read(url, str(tmp_path / "r"))
    assert back.height == want.height
    assert_frame_equal(sort_frame(back, want.columns), sort_frame(want, want.columns))


def test_store_down_for_a_while_then_back(tables_s3, tables_bucket, run_dir):
    import threading

    from tests.connectors.tables_common import FlakyProxy

    proxy = FlakyProxy(int(tables_s3.rsplit(":", 1)[1]))
    opts = {"AWS_ENDPOINT_URL": proxy.url, "AWS_ALLOW_HTTP": "true", "max_retries": "1", "retry_timeout": "1s"}
    url = f"s3://{tables_bucket}/flaky/t"
    write("flaky0", run_dir, pl.DataFrame({"x": [-1]}), delta.table(url, storage_options=opts))
    proxy.down()
    restarter = threading.Timer(1.0, proxy.up)
    restarter.start()
    try:
        write("flaky", run_dir, pl.DataFrame({"x": list(range(100))}),
              delta.table(url, storage_options=opts, retries=8, retry_backoff_s=0.2))
    finally:
        restarter.join()
        proxy.down()
    assert sorted(read(url, run_dir)["x"].to_list()) == [-1, *range(100)]
