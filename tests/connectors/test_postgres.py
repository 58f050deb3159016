"""PostgreSQL sink and query source against a real server started for the session."""
from __future__ import annotations

import threading
import time

import polars as pl
import pytest
from polars.testing import assert_frame_equal

import streamfn as sf
from streamfn.connectors import memory, postgres
from streamfn.connectors._exactly_once import SchemaMismatch, TargetUnavailable
from streamfn.errors import ConfigError
from tests.connectors import _tables_job as job
from tests.connectors.tables_common import run_killed_then_restarted, sort_frame, ticks_file, typed_frame

pytestmark = pytest.mark.integration


def write(name: str, run_dir: str, data, sink, batch_rows: int = 1000, threads: int = 2) -> None:
    p = sf.Pipeline(name, run_dir=run_dir, batch_rows=batch_rows, threads=threads)
    p.source(memory.source(data)).sink(sink)
    p.run(until_idle=True)


def read(dsn: str, sql: str, run_dir: str) -> pl.DataFrame:
    p = sf.Pipeline("reader", run_dir=run_dir + "-read")
    out = memory.sink()
    p.source(postgres.query(sql, dsn=dsn)).sink(out)
    p.run(until_idle=True)
    return out.frame()


def test_every_type_round_trips(pg_dsn, pg_table, run_dir):
    df = typed_frame()
    write("types", run_dir, df, postgres.table(pg_table, dsn=pg_dsn), batch_rows=17)
    back = read(pg_dsn, f"select * from {pg_table} order by id", run_dir)
    assert back.columns == df.columns
    assert_frame_equal(back, df, check_dtypes=False)
    assert back.schema["at"] == pl.Datetime("us", "UTC")
    assert back.schema["amount"] == pl.Decimal(18, 4)
    assert back.schema["tags"] == pl.List(pl.String)


def test_append_is_exactly_once_when_the_source_is_read_again(pg_dsn, pg_table, run_dir):
    data = {str(k): pl.DataFrame({"k": [k] * 500, "x": list(range(500))}) for k in range(3)}
    sink_args = dict(dsn=pg_dsn)
    write("again", run_dir, data, postgres.table(pg_table, **sink_args), batch_rows=64)
    # a new run re-reads every partition from the start (no checkpoint): nothing may repeat
    write("again", run_dir, data, postgres.table(pg_table, **sink_args), batch_rows=100)
    back = read(pg_dsn, f"select k, x from {pg_table} order by k, x", run_dir)
    assert back.height == 1500
    progress = read(pg_dsn, "select lane, high_offset from streamfn_progress where pipeline = 'again' "
                    f"and target = '{pg_table}' order by lane", run_dir)
    assert progress["high_offset"].to_list() == [499, 499, 499]


def test_upsert_updates_rows_by_key(pg_dsn, pg_table, run_dir):
    first = pl.DataFrame({"id": [1, 2, 3], "v": ["a", "b", "c"]})
    second = pl.DataFrame({"id": [3, 4, 4], "v": ["C", "d", "D"]})  # 4 twice: the later row wins
    write("up1", run_dir, first, postgres.table(pg_table, dsn=pg_dsn, mode="upsert", key=["id"]))
    write("up2", run_dir, second, postgres.table(pg_table, dsn=pg_dsn, mode="upsert", key=["id"]))
    back = read(pg_dsn, f"select id, v from {pg_table} order by id", run_dir)
    assert back.to_dict(as_series=False) == {"id": [1, 2, 3, 4], "v": ["a", "b", "C", "D"]}


def test_schema_mismatch_is_a_clear_error(pg_dsn, pg_table, run_dir):
    write("s1", run_dir, pl.DataFrame({"id": [1], "v": ["a"]}), postgres.table(pg_table, dsn=pg_dsn))
    with pytest.raises(SchemaMismatch, match=r"column v is text, the batch gives double"):
        write("s2", run_dir, pl.DataFrame({"id": [2], "v": [1.5]}), postgres.table(pg_table, dsn=pg_dsn))
    with pytest.raises(SchemaMismatch, match=r"missing \['v'\], unexpected \['w'\]"):
        write("s3", run_dir, pl.DataFrame({"id": [2], "w": ["x"]}), postgres.table(pg_table, dsn=pg_dsn))


def test_config_errors(pg_dsn, pg_table, monkeypatch):
    with pytest.raises(ConfigError, match="needs key"):
        postgres.table(pg_table, dsn=pg_dsn, mode="upsert")
    monkeypatch.delenv("STREAMFN_POSTGRES_DSN", raising=False)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    with pytest.raises(ConfigError, match="no PostgreSQL DSN"):
        postgres.resolve_dsn(None)
    monkeypatch.setenv("MY_PG", pg_dsn)
    assert postgres.resolve_dsn("env:MY_PG") == pg_dsn


def test_password_file_goes_into_the_dsn_and_not_the_description(tmp_path, pg_dsn):
    secret = tmp_path / "pw"
    secret.write_text("s3cr@t/pw\n")
    dsn = postgres.resolve_dsn(pg_dsn, password_file=str(secret))
    assert "s3cr%40t%2Fpw@" in dsn
    sink = postgres.table("t", dsn=pg_dsn, password_file=str(secret))
    assert "s3cr" not in sink.describe()


def test_target_down_for_a_while_then_back(pg_server, pg_table, run_dir):
    df = pl.DataFrame({"x": list(range(300))})
    write("outage0", run_dir, df.head(1), postgres.table(pg_table, dsn=pg_server.dsn))  # creates table
    pg_server.stop()
    restarter = threading.Timer(1.0, pg_server.start)
    restarter.start()
    try:
        write("outage", run_dir, df, postgres.table(pg_table, dsn=pg_server.dsn, retries=8,
                                                    retry_backoff_s=0.2))
    finally:
        restarter.join()
    back = read(pg_server.dsn, f"select x from {pg_table} order by x", run_dir)
    assert back["x"].to_list() == [0, *range(300)]


def test_target_down_too_long_fails_clearly_and_loses_nothing(pg_server, pg_table, run_dir):
    df = pl.DataFrame({"x": list(range(200))})
    write("down0", run_dir, df.head(0).vstack(pl.DataFrame({"x": [-1]})),
          postgres.table(pg_table, dsn=pg_server.dsn))
    pg_server.stop()
    try:
        started = time.monotonic()
        with pytest.raises(TargetUnavailable, match="failed after 3 attempts"):
            write("down", run_dir, df, postgres.table(pg_table, dsn=pg_server.dsn, retries=2,
                                                      retry_backoff_s=0.05))
        assert time.monotonic() - started < 60  # bounded: it gave up instead of waiting forever
    finally:
        pg_server.start()
    write("down", run_dir, df, postgres.table(pg_table, dsn=pg_server.dsn))
    back = read(pg_server.dsn, f"select x from {pg_table} order by x", run_dir)
    assert back["x"].to_list() == [-1, *range(200)]


def test_kill_9_in_the_middle_then_restart_gives_each_row_once(pg_dsn, pg_table, tmp_path):
    source = ticks_file(str(tmp_path / "ticks.jsonl"), 60_000)
    want = job.expected(source)
    at_kill: list[int] = []

    def count() -> None:
        at_kill.append(read(pg_dsn, f"select count(*) as n from {pg_table}", str(tmp_path / "c"))["n"][0])

    run_killed_then_restarted("postgres", source, str(tmp_path), {"table": pg_table, "dsn": pg_dsn},
                              after_kill=count)
    assert at_kill[0] < want.height  # the kill came before the end
    print("rows in the table when killed:", at_kill[0], "of", want.height)
    back = read(pg_dsn, f"select * from {pg_table}", str(tmp_path / "r"))
    assert back.height == want.height
    assert_frame_equal(sort_frame(back, want.columns), sort_frame(want, want.columns))


def test_query_source_passes_the_contract_kit(pg_dsn, pg_table, run_dir):
    from streamfn.sourcekit import check_source

    write("kit", run_dir, pl.DataFrame({"x": list(range(40))}), postgres.table(pg_table, dsn=pg_dsn))
    rows = check_source(postgres.query(f"select x from {pg_table} order by x", dsn=pg_dsn), expected_rows=40)
    assert sorted(rows["x"].to_list()) == list(range(40))


def test_a_replay_cuts_its_batches_where_the_committed_rows_end(pg_dsn, pg_table, run_dir):
    # run 1 commits the first 250 rows; run 2 reads all 500 again with other batch sizes and
    # a filter, so offsets no longer map 1:1 to rows: the lane must cut a batch at offset 249
    whole = pl.DataFrame({"x": list(range(500))})
    for rows, batch_rows in ((250, 64), (500, 100)):
        p = sf.Pipeline("cuts", run_dir=run_dir, batch_rows=batch_rows)
        src = p.source(memory.source(whole.head(rows)))
        p.stage(src, name="odd")(lambda df: df.filter(pl.col("x") % 2 == 1)).sink(
            postgres.table(pg_table, dsn=pg_dsn))
        p.run(until_idle=True)
    back = read(pg_dsn, f"select x from {pg_table} order by x", run_dir)
    assert back["x"].to_list() == list(range(1, 500, 2))


def test_kill_9_in_a_kafka_fed_run_then_restart_gives_each_row_once(pg_dsn, pg_table, tmp_path, kafka_tansu):
    import json

    from tests.connectors.tables_common import produce_ticks

    source = ticks_file(str(tmp_path / "ticks.jsonl"), 40_000)
    topic = kafka_tansu.topic_name("ticks")
    produce_ticks(kafka_tansu.bootstrap, topic, source)
    env = {"TABLES_JOB_SETTINGS": json.dumps(kafka_tansu.run_settings())}
    run_killed_then_restarted("postgres", f"kafka:{topic}", str(tmp_path), {"table": pg_table, "dsn": pg_dsn},
                              env=env, kill_after_batches=6)
    want = job.expected(source)
    back = read(pg_dsn, f"select * from {pg_table}", str(tmp_path / "r"))
    assert back.height == want.height
    assert_frame_equal(sort_frame(back, want.columns), sort_frame(want, want.columns))


def test_connection_lost_inside_a_transaction_sends_the_rows_again(pg_server, pg_table, run_dir):
    from types import SimpleNamespace

    from streamfn.batch import Batch

    sink = postgres.table(pg_table, dsn=pg_server.dsn, retries=8, retry_backoff_s=0.2)
    sink.start(SimpleNamespace(pipeline="mid"))
    writer = sink.for_lane("src[0]")
    writer.write(Batch(pl.DataFrame({"x": list(range(100))}), "src", "0", 0, 99))  # sent, not committed
    pg_server.stop()  # the open transaction and its rows are gone
    pg_server.start()
    writer.write(Batch(pl.DataFrame({"x": list(range(100, 200))}), "src", "0", 100, 199))
    writer.flush("0000000000001-00000001")
    writer.close()
    back = read(pg_server.dsn, f"select x from {pg_table} order by x", run_dir)
    assert back["x"].to_list() == list(range(200))
