"""The v3io connector end to end against the framesd test double (tests/servers/v3io.py), through the
real v3io-frames client over HTTP (and gRPC), plus conversion tests for every column type."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal

import polars as pl
import pytest
import v3io_frames as v3f

import streamfn as sf
from streamfn.connectors import memory, v3io
from streamfn.errors import ConfigError

TICKS = pl.DataFrame({"symbol": ["A", "B", "C", "D"], "price": [10.5, 20.25, 7.0, 99.9],
                      "volume": [100, 0, 300, 50], "ts": [1_700_000_000_000 + i * 1000 for i in range(4)]})


@pytest.fixture
def conn(v3io_server):
    """Connection options for the HTTP double, given as arguments."""
    return {"address": v3io_server.address, "container": "bigdata", "access_key": v3io_server.access_key}


def client(server) -> v3f.Client:
    return v3f.Client(server.address, container="bigdata", token=server.access_key)


def run(source, sink_connector, run_dir, *, checkpoint=None, name="v3io_job") -> memory.MemorySink | None:
    p = sf.Pipeline(name, run_dir=run_dir, checkpoint=checkpoint, checkpoint_interval="50ms")
    src = p.source(source)
    sink = sink_connector or memory.sink()
    src.sink(sink)
    p.run(until_idle=True, handle_signals=False)
    return sink if sink_connector is None else None


def dead_letters(run_dir: str) -> pl.DataFrame:
    files = [os.path.join(r, f) for r, _, fs in os.walk(run_dir) for f in fs if f.endswith(".jsonl")]
    return pl.concat([pl.read_ndjson(f) for f in files]) if files else pl.DataFrame()


def test_kv_sink_upserts_by_key_and_the_kv_source_reads_it_back(v3io_server, conn, run_dir) -> None:
    run(memory.source(TICKS), v3io.kv("/tables/ticks", key="symbol", **conn), run_dir + "/1")
    changed = pl.DataFrame({"symbol": ["B", "E"], "price": [21.0, 1.0], "volume": [5, 6],
                            "ts": [1, 2]})
    run(memory.source(changed), v3io.kv("/tables/ticks", key="symbol", **conn), run_dir + "/2")
    out = run(v3io.kv("/tables/ticks", **conn), None, run_dir + "/3")
    got = out.frame().sort("symbol")
    expected = pl.concat([TICKS.filter(~pl.col("symbol").is_in(["B"])), changed]).sort("symbol")
    assert got.select(expected.columns).equals(expected)
    # the real client reads the same items
    items = client(v3io_server).read("kv", "/tables/ticks")
    assert sorted(items.index) == ["A", "B", "C", "D", "E"] and items.loc["B", "price"] == 21.0


def test_kv_source_projects_columns_and_resumes_from_its_position(v3io_server, conn, run_dir) -> None:
    big = pl.DataFrame({"k": [f"k{i:03d}" for i in range(250)], "v": list(range(250)), "w": [0.5] * 250})
    run(memory.source(big), v3io.kv("/tables/big", key="k", **conn), run_dir + "/w")
    source = v3io.kv("/tables/big", columns=["k", "v"], **conn)
    source.start(None)  # type: ignore[arg-type]
    reader = source.open("items", 200)
    batches = []
    with pytest.raises(sf.EndOfInput):
        while True:
            batches.append(pl.from_arrow(reader.next_batch(30)))
    rest = pl.concat(batches)
    assert rest.columns == ["k", "v"] and all(b.height <= 30 for b in batches)
    assert rest["k"].to_list() == [f"k{i:03d}" for i in range(200, 250)] and reader.position() == 250


def test_null_keys_go_to_the_dead_letters(conn, run_dir) -> None:
    rows = pl.DataFrame({"symbol": ["A", None, "C"], "price": [1.0, 2.0, 3.0]})
    run(memory.source(rows), v3io.kv("/tables/nulls", key="symbol", **conn), run_dir)
    letters = dead_letters(run_dir)
    assert letters.height == 1 and letters["error"][0] == "null key 'symbol'"
    assert json.loads(letters["payload"][0])["price"] == 2.0


def test_tsdb_sink_writes_samples_with_labels(v3io_server, conn, run_dir) -> None:
    frame = TICKS.with_columns(pl.col("ts").cast(pl.Datetime("ms")))
    run(memory.source(frame), v3io.tsdb("/tsdb/ticks", time="ts", labels=["symbol"], **conn), run_dir)
    got = client(v3io_server).read("tsdb", "/tsdb/ticks", multi_index=True)
    got = pl.from_pandas(got.reset_index()).sort("symbol")
    assert got["symbol"].to_list() == ["A", "B", "C", "D"]
    assert got["price"].to_list() == TICKS["price"].to_list()
    assert got["volume"].to_list() == [100.0, 0.0, 300.0, 50.0]  # TSDB keeps floats
    assert got["time"].dt.epoch("ms").to_list() == TICKS["ts"].to_list()


def test_tsdb_refuses_text_metrics(conn, run_dir) -> None:
    with pytest.raises(ConfigError, match="metric 'symbol' is String; TSDB metrics are numbers"):
        run(memory.source(TICKS), v3io.tsdb("/tsdb/bad", time="ts", **conn), run_dir)


def stream_source(conn, **kw):
    return v3io.stream("/streams/ticks", shards=2, schema={"volume": pl.Int64, "ts": pl.Int64}, **conn, **kw)


def test_stream_round_trip_with_shards_as_partitions_and_checkpointed_positions(v3io_server, conn, run_dir,
                                                                               tmp_path) -> None:
    sink = v3io.stream("/streams/ticks", shards=2, create=True, **conn)
    run(memory.source(TICKS), sink, run_dir + "/w1")
    checkpoint = str(tmp_path / "ckpt")
    first = run(stream_source(conn), None, run_dir + "/r1", checkpoint=checkpoint, name="reader")
    assert first.frame().sort("symbol").equals(TICKS.select(first.frame().columns).sort("symbol"))
    assert first.frame().schema["volume"] == pl.Int64  # cast back from JSON's floats
    more = pl.DataFrame({"symbol": ["E", "F", "G"], "price": [1.0, 2.0, 3.0], "volume": [1, 2, 3], "ts": [7, 8, 9]})
    run(memory.source(more), v3io.stream("/streams/ticks", **conn), run_dir + "/w2")
    second = run(stream_source(conn), None, run_dir + "/r2", checkpoint=checkpoint, name="reader")
    assert sorted(second.frame()["symbol"].to_list()) == ["E", "F", "G"]  # resumed after the checkpoint
    shards = v3io_server.store.tables[("bigdata", "stream", "streams/ticks")].shards
    assert [len(s) for s in shards] == [4, 3]


def test_stream_records_that_are_not_json_become_dead_letters(v3io_server, conn, run_dir) -> None:
    client(v3io_server).create("stream", "/streams/raw", shards=1, retention_hours=1)
    session = {"container": "bigdata", "token": v3io_server.access_key}
    v3io_server.store.put_record(session, "/streams/raw", 0, b'{"symbol": "A", "volume": 1}')
    v3io_server.store.put_record(session, "/streams/raw", 0, b"not json at all")
    v3io_server.store.put_record(session, "/streams/raw", 0, b'{"symbol": "B", "volume": "lots"}')
    v3io_server.store.put_record(session, "/streams/raw", 0, b'{"symbol": "C", "volume": 3}')
    source = v3io.stream("/streams/raw", shards=1, schema={"volume": pl.Int64}, metadata=True, **conn)
    out = run(source, None, run_dir).frame()
    assert out["symbol"].to_list() == ["A", "C"] and out["seq_number"].to_list() == [1, 4]
    letters = dead_letters(run_dir).sort("offset")
    assert letters["offset"].to_list() == ["2", "3"]
    assert letters["error"].to_list() == ["v3io stream record is not a JSON object",
                                          "field 'volume': cannot convert 'lots' to Int64"]


def test_the_same_connector_works_over_grpc(v3io_grpc_server, run_dir) -> None:
    conn = {"address": v3io_grpc_server.address, "container": "bigdata", "access_key": v3io_grpc_server.access_key}
    run(memory.source(TICKS), v3io.kv("/tables/g", key="symbol", **conn), run_dir + "/w")
    out = run(v3io.kv("/tables/g", **conn), None, run_dir + "/r").frame().sort("symbol")
    assert out.select(TICKS.columns).equals(TICKS)


def test_connection_options_come_from_the_environment(v3io_server, run_dir, monkeypatch) -> None:
    monkeypatch.setenv("V3IO_FRAMESD", v3io_server.address)
    monkeypatch.setenv("V3IO_CONTAINER", "bigdata")
    monkeypatch.setenv("V3IO_ACCESS_KEY", v3io_server.access_key)
    run(memory.source(TICKS), v3io.kv("/tables/env", key="symbol"), run_dir)
    assert len(client(v3io_server).read("kv", "/tables/env")) == 4
    monkeypatch.setenv("V3IO_ACCESS_KEY", "wrong")
    with pytest.raises(Exception, match="access key"):
        run(memory.source(TICKS), v3io.kv("/tables/env", key="symbol"), run_dir + "/2")
    monkeypatch.delenv("V3IO_FRAMESD")
    with pytest.raises(ConfigError, match="no framesd address; pass address=..., --set v3io.address=URL or set "
                                          "V3IO_FRAMESD"):
        run(memory.source(TICKS), v3io.kv("/tables/env", key="symbol"), run_dir + "/3")


def test_an_unreachable_server_fails_at_start(run_dir) -> None:
    sink = v3io.kv("/t", key="symbol", address="http://127.0.0.1:9", container="c")
    with pytest.raises(ConfigError, match=r"v3io: cannot reach framesd at http://127.0.0.1:9"):
        run(memory.source(TICKS), sink, run_dir)


def test_without_the_extra_the_message_names_it() -> None:
    code = ("import sys; sys.modules['v3io_frames'] = None\n"
            "from streamfn.connectors import v3io\n"
            "sink = v3io.kv('/t', key='k', address='http://127.0.0.1:9', container='c')\n"
            "try:\n    sink.start(None)\nexcept Exception as exc:\n    print(type(exc).__name__, exc)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "MissingDependency" in done.stdout and 'pip install "streamfn[v3io]"' in done.stdout


# -- conversion of every column type ----------------------------------------------------------------
UTC = timezone.utc
ALL_TYPES = pl.DataFrame({
    "key": ["a", "b", "c"],
    "i8": pl.Series([1, None, -3], dtype=pl.Int8), "i16": pl.Series([1, 2, 3], dtype=pl.Int16),
    "i32": pl.Series([1, 2, None], dtype=pl.Int32), "i64": pl.Series([2**62, -1, 0], dtype=pl.Int64),
    "u8": pl.Series([1, 2, 3], dtype=pl.UInt8), "u32": pl.Series([4, 5, 6], dtype=pl.UInt32),
    "u64": pl.Series([7, None, 2**63 - 1], dtype=pl.UInt64),
    "f32": pl.Series([1.5, None, -2.25], dtype=pl.Float32), "f64": [0.1, 1e300, None],
    "dec": pl.Series([Decimal("1.25"), Decimal("2.50"), None], dtype=pl.Decimal(10, 2)),
    "flag": [True, False, True], "flag_null": [True, None, False],
    "text": ["x", None, "ünïcode"], "cat": pl.Series(["p", "q", "p"], dtype=pl.Categorical),
    "enum": pl.Series(["lo", "hi", "lo"], dtype=pl.Enum(["lo", "hi"])),
    "ts_ms": pl.Series([datetime(2024, 1, 2, 3, 4, 5, 6000), None, datetime(1970, 1, 1)], dtype=pl.Datetime("ms")),
    "ts_us": pl.Series([datetime(2024, 1, 2, 3, 4, 5, 123456)] * 3, dtype=pl.Datetime("us")),
    "ts_ns": pl.Series([datetime(2024, 1, 2)] * 3, dtype=pl.Datetime("ns")),
    "ts_berlin": pl.Series([datetime(2024, 6, 1, 12)] * 3, dtype=pl.Datetime("us", "Europe/Berlin")),
    "day": [date(2024, 2, 29), None, date(1999, 12, 31)],
    "dur": pl.Series([timedelta(seconds=1), timedelta(microseconds=5), None], dtype=pl.Duration("us")),
})


def expected_types() -> pl.DataFrame:
    utc = pl.Datetime("ns", "UTC")
    ints = [c for c in ALL_TYPES.columns if c[0] in "iu"]
    return ALL_TYPES.with_columns(
        *[pl.col(c).cast(pl.Int64) for c in ints],
        pl.col("f32", "f64", "dec").cast(pl.Float64),
        pl.col("cat", "enum").cast(pl.String),
        *[pl.col(c).dt.replace_time_zone("UTC").dt.cast_time_unit("ns") for c in ("ts_ms", "ts_us", "ts_ns")],
        pl.col("ts_berlin").dt.convert_time_zone("UTC").dt.cast_time_unit("ns"),
        pl.col("day").cast(pl.Datetime("ns")).dt.replace_time_zone("UTC").cast(utc),
        pl.col("dur").dt.cast_time_unit("ns").cast(pl.Int64),
    )


def test_every_column_type_survives_a_kv_round_trip(conn, run_dir) -> None:
    run(memory.source(ALL_TYPES), v3io.kv("/tables/types", key="key", **conn), run_dir + "/w")
    got = run(v3io.kv("/tables/types", **conn), None, run_dir + "/r").frame().sort("key")
    expected = expected_types()
    assert got.select(expected.columns).equals(expected), (got.schema, expected.schema)


@pytest.mark.parametrize("column", [
    pl.Series("b", [b"\x00"], dtype=pl.Binary), pl.Series("l", [[1, 2]]), pl.Series("s", [{"a": 1}]),
    pl.Series("t", [datetime(2024, 1, 1).time()]), pl.Series("arr", [[1, 2]], dtype=pl.Array(pl.Int64, 2)),
    pl.Series("o", [object()], dtype=pl.Object),
])
def test_types_v3io_cannot_store_are_refused_by_name(column, conn, run_dir) -> None:
    frame = pl.DataFrame({"key": ["a"]}).with_columns(column)
    with pytest.raises(ConfigError, match=f"column '{column.name}' is .*which v3io cannot store"):
        run(memory.source(frame), v3io.kv("/tables/bad", key="key", **conn), run_dir)


def test_uint64_above_int64_is_refused(conn, run_dir) -> None:
    frame = pl.DataFrame({"key": ["a"], "u": pl.Series([2**64 - 1], dtype=pl.UInt64)})
    with pytest.raises(ConfigError, match="UInt64 values above 2\\*\\*63-1"):
        run(memory.source(frame), v3io.kv("/tables/bad", key="key", **conn), run_dir)
