"""Files on fsspec URLs: every format as source and sink, globbing, offsets, schemas, atomic publish."""
from __future__ import annotations

import json
import os
import uuid

import fsspec
import polars as pl
import pytest
from polars.testing import assert_frame_equal

import streamfn as sf
from streamfn.connectors import files, memory
from streamfn.sourcekit import check_source
from tests.helpers import read_dead_letters

TICKS = pl.DataFrame({
    "symbol": [f"SYM{i % 7:03d}" for i in range(50)],
    "ts": [1_700_000_000_000 + i for i in range(50)],
    "price": [10.0 + i / 4 for i in range(50)],
    "volume": [0 if i % 10 == 0 else i * 3 for i in range(50)],
})
SCHEMA = {"symbol": pl.String, "ts": pl.Int64, "price": pl.Float64, "volume": pl.Int64}


def write(fmt: str, frame: pl.DataFrame, path: str) -> None:
    with fsspec.open(path, "wb") as fh:
        {"ndjson": frame.write_ndjson, "csv": frame.write_csv, "parquet": frame.write_parquet,
         "arrow": frame.write_ipc}[fmt](fh)


def read_dir(fmt: str, url: str) -> pl.DataFrame:
    fs, path = fsspec.core.url_to_fs(url)
    names = sorted(p for p in fs.ls(path, detail=False) if not p.rsplit("/", 1)[-1].startswith("."))
    readers = {"ndjson": pl.read_ndjson, "csv": pl.read_csv, "parquet": pl.read_parquet, "arrow": pl.read_ipc}
    frames = []
    for name in names:
        with fs.open(name, "rb") as fh:
            frames.append(readers[fmt](fh.read()))
    return pl.concat(frames) if frames else pl.DataFrame()


FORMATS = ["ndjson", "csv", "parquet", "arrow"]
EXT = {"ndjson": "jsonl", "csv": "csv", "parquet": "parquet", "arrow": "arrow"}


@pytest.fixture(params=["local", "memory"])
def base(request, tmp_path):
    if request.param == "local":
        return str(tmp_path)
    return f"memory://streamfn-test-{uuid.uuid4().hex[:8]}"


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_round_trips_through_a_pipeline(fmt, base, run_dir):
    for i in range(3):
        write(fmt, TICKS.slice(i * 20, 20), f"{base}/in/part-{i}.{EXT[fmt]}")
    p = sf.Pipeline(f"rt-{fmt}", run_dir=run_dir, batch_rows=8)
    src = p.source(getattr(files, fmt)(f"{base}/in/*.{EXT[fmt]}", schema=SCHEMA))
    src.sink(getattr(files, fmt)(f"{base}/out/"))
    summary = p.run(until_idle=True)
    assert summary.lanes == 3 and summary.dead_letters == 0
    out = read_dir(fmt, f"{base}/out").sort("ts")
    assert_frame_equal(out, TICKS, check_dtypes=fmt not in ("csv", "ndjson"))


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_passes_the_source_contract_kit(fmt, tmp_path):
    write(fmt, TICKS, f"{tmp_path}/a.{EXT[fmt]}")
    write(fmt, TICKS.head(9), f"{tmp_path}/b.{EXT[fmt]}")
    rows = check_source(getattr(files, fmt)(f"{tmp_path}/*.{EXT[fmt]}", schema=SCHEMA), expected_rows=59)
    assert_frame_equal(rows.head(50), TICKS)


def test_a_directory_url_reads_the_files_of_its_format_and_skips_hidden_ones(tmp_path):
    write("ndjson", TICKS.head(5), f"{tmp_path}/d/a.jsonl")
    write("ndjson", TICKS.head(5), f"{tmp_path}/d/.hidden.jsonl")
    write("ndjson", TICKS.head(5), f"{tmp_path}/d/_tmp.jsonl")
    (tmp_path / "d" / "notes.txt").write_text("not data")
    assert files.ndjson(f"{tmp_path}/d").partitions() == [f"{tmp_path}/d/a.jsonl"]


def test_no_matching_file_is_a_clear_error(tmp_path, run_dir):
    p = sf.Pipeline("nofile", run_dir=run_dir)
    p.source(files.parquet(f"{tmp_path}/missing/*.parquet")).sink(memory.sink())
    with pytest.raises(sf.ConfigError, match="no parquet files match"):
        p.run(until_idle=True)


def test_malformed_json_lines_become_dead_letters_with_their_line_number(tmp_path, run_dir):
    lines = [json.dumps(r) for r in TICKS.head(10).to_dicts()]
    lines[2] = '{"symbol": "SYM001", "ts": 1'                   # cut short
    lines[5] = "not json at all"
    lines[7] = '{"symbol": "SYM002", "ts": 5, "price": 1.0, "volume": "many"}'  # wrong type
    lines[8] = "[1, 2]"                                           # not an object
    (tmp_path / "t.jsonl").write_text("\n".join(lines) + "\n")
    p = sf.Pipeline("badjson", run_dir=run_dir)
    out = memory.sink()
    p.source(files.ndjson(str(tmp_path / "t.jsonl"), schema=SCHEMA)).sink(out)
    summary = p.run(until_idle=True)
    assert out.frame().height == 6 and summary.dead_letters == 4
    letters = {int(d["offset"]): d for d in read_dead_letters(run_dir)}
    assert sorted(letters) == [2, 5, 7, 8]
    assert letters[5]["payload"] == "not json at all" and "malformed JSON" in letters[5]["error"]
    assert "'volume' is not Int64" in letters[7]["error"]
    assert "expected a JSON object" in letters[8]["error"]


def test_without_a_schema_the_first_batch_fixes_it_and_drift_is_dead_lettered(tmp_path, run_dir):
    (tmp_path / "t.jsonl").write_text('{"a": 1, "b": "x"}\n{"a": 2, "b": "y"}\n{"a": "three", "b": "z"}\n{"a": 4}\n')
    p = sf.Pipeline("drift", run_dir=run_dir, batch_rows=2)
    out = memory.sink()
    p.source(files.ndjson(str(tmp_path / "t.jsonl"))).sink(out)
    summary = p.run(until_idle=True)
    assert out.frame().sort("a").to_dicts() == [{"a": 1, "b": "x"}, {"a": 2, "b": "y"}, {"a": 4, "b": None}]
    assert summary.dead_letters == 1


def test_non_utf8_lines_are_kept_in_base64(tmp_path, run_dir):
    (tmp_path / "t.jsonl").write_bytes(b'{"a": 1}\n\xff\xfe{"a": 2}\n{"a": 3}\n')
    p = sf.Pipeline("bytes", run_dir=run_dir)
    out = memory.sink()
    p.source(files.ndjson(str(tmp_path / "t.jsonl"), schema={"a": pl.Int64})).sink(out)
    p.run(until_idle=True)
    [letter] = read_dead_letters(run_dir)
    assert letter["payload_encoding"] == "base64" and letter["offset"] == "1"
    assert sorted(out.frame()["a"].to_list()) == [1, 3]


def test_csv_rows_with_bad_values_or_columns_are_dead_lettered(tmp_path, run_dir):
    (tmp_path / "t.csv").write_text("a,b\n1,x\n2\nthree,z\n4,w\n")
    p = sf.Pipeline("badcsv", run_dir=run_dir)
    out = memory.sink()
    p.source(files.csv(str(tmp_path / "t.csv"), schema={"a": pl.Int64, "b": pl.String})).sink(out)
    summary = p.run(until_idle=True)
    assert out.frame().sort("a").to_dicts() == [{"a": 1, "b": "x"}, {"a": 4, "b": "w"}]
    assert summary.dead_letters == 2


def test_csv_without_a_schema_infers_types(tmp_path):
    (tmp_path / "t.csv").write_text("n,f,flag,s\n1,1.5,true,a\n2,2,false,b\n")
    rows = check_source(files.csv(str(tmp_path / "t.csv")), expected_rows=2)
    assert rows.schema == pl.Schema({"n": pl.Int64, "f": pl.Float64, "flag": pl.Boolean, "s": pl.String})


def test_a_parquet_file_missing_a_schema_column_is_a_clear_error(tmp_path, run_dir):
    write("parquet", TICKS.drop("volume"), f"{tmp_path}/t.parquet")
    p = sf.Pipeline("pqschema", run_dir=run_dir)
    p.source(files.parquet(f"{tmp_path}/t.parquet", schema=SCHEMA)).sink(memory.sink())
    with pytest.raises(sf.ConfigError, match="has no column 'volume' that the schema names"):
        p.run(until_idle=True)


def test_sink_files_appear_only_when_published_and_never_half_written(tmp_path, run_dir):
    write("ndjson", TICKS, f"{tmp_path}/in.jsonl")
    out_dir = tmp_path / "out"
    seen_during_run: list[list[str]] = []
    p = sf.Pipeline("atomic", run_dir=run_dir, batch_rows=10, checkpoint_interval="1h")
    src = p.source(files.ndjson(f"{tmp_path}/in.jsonl", schema=SCHEMA))

    @p.stage(src)
    def watch(df):
        seen_during_run.append(sorted(os.listdir(out_dir)) if out_dir.exists() else [])
        return df

    watch.sink(files.parquet(str(out_dir)))
    p.run(until_idle=True)
    # Before the lane's one commit at the end, only temporary (hidden, *.tmp) files existed.
    assert all(name.startswith(".") and name.endswith(".tmp") for names in seen_during_run for name in names)
    published = sorted(os.listdir(out_dir))
    assert published and all(n.startswith("part-") and n.endswith(".parquet") for n in published)
    assert pl.read_parquet(f"{out_dir}/*.parquet").height == 50


def test_a_failed_run_publishes_nothing_and_leaves_no_temporary_files(tmp_path, run_dir):
    write("ndjson", TICKS, f"{tmp_path}/in.jsonl")
    p = sf.Pipeline("failed", run_dir=run_dir, batch_rows=10, checkpoint_interval="1h")
    src = p.source(files.ndjson(f"{tmp_path}/in.jsonl", schema=SCHEMA))
    src.stage(lambda df: "oops" if df["ts"][0] >= TICKS["ts"][30] else df, name="breaks") \
        .sink(files.parquet(str(tmp_path / "out")))
    with pytest.raises(sf.StageError, match="stage 'breaks'"):
        p.run(until_idle=True)
    assert os.listdir(tmp_path / "out") == []


def test_sink_rolls_files_at_max_rows_and_on_schema_change(tmp_path, run_dir):
    p = sf.Pipeline("roll", run_dir=run_dir)
    src = p.source(memory.source([TICKS.head(25), TICKS.tail(25), TICKS.head(5).select("symbol")]))
    src.sink(files.ndjson(str(tmp_path / "out"), max_rows_per_file=20))
    p.run(until_idle=True)
    names = sorted(os.listdir(tmp_path / "out"))
    # A file closes once it holds 20 rows or more; new columns start a new file.
    assert [len((tmp_path / "out" / n).read_text().splitlines()) for n in names] == [25, 25, 5]


def test_watch_mode_picks_up_new_files_until_idle(tmp_path, run_dir):
    write("ndjson", TICKS.head(5), f"{tmp_path}/a.jsonl")
    p = sf.Pipeline("watch", run_dir=run_dir)
    out = memory.sink()
    added = []

    @p.stage(p.source(files.ndjson(f"{tmp_path}/*.jsonl", schema=SCHEMA, watch=True)))
    def add_file_once(df):
        if not added:
            added.append(True)
            write("ndjson", TICKS.tail(7), f"{tmp_path}/b.jsonl")
        return df

    add_file_once.sink(out)
    summary = p.run(until_idle=True)
    assert out.frame().height == 12 and summary.lanes == 2


@pytest.mark.integration
@pytest.mark.parametrize("fmt", ["ndjson", "parquet"])
def test_files_on_s3_round_trip(fmt, s3_bucket, run_dir):
    options = {"endpoint_url": s3_bucket.endpoint, "key": "testing", "secret": "testing"}
    for i in range(2):
        write_with = fsspec.open(s3_bucket.url(f"in/part-{i}.{EXT[fmt]}"), "wb", **options)
        with write_with as fh:
            (TICKS.slice(i * 25, 25).write_ndjson if fmt == "ndjson" else TICKS.slice(i * 25, 25).write_parquet)(fh)
    p = sf.Pipeline(f"s3-{fmt}", run_dir=run_dir)
    src = p.source(getattr(files, fmt)(s3_bucket.url(f"in/*.{EXT[fmt]}"), schema=SCHEMA, storage_options=options))
    src.stage(lambda df: df.filter(pl.col("volume") > 0), name="clean") \
        .sink(getattr(files, fmt)(s3_bucket.url("out/"), storage_options=options))
    summary = p.run(until_idle=True)
    assert summary.lanes == 2
    fs = fsspec.filesystem("s3", **options)
    names = fs.ls(f"{s3_bucket.name}/out", detail=False)
    assert names and all(n.rsplit("/", 1)[-1].startswith("part-") for n in names)
    reader = pl.read_ndjson if fmt == "ndjson" else pl.read_parquet
    out = pl.concat([reader(fs.cat(n)) for n in names]).sort("ts")
    assert_frame_equal(out, TICKS.filter(pl.col("volume") > 0), check_dtypes=False)


def test_a_custom_dead_letter_sink_gets_the_failed_records(tmp_path, run_dir):
    (tmp_path / "t.jsonl").write_text('{"a": 1}\nnope\n{"a": 2}\n')
    p = sf.Pipeline("customdlq", run_dir=run_dir)
    letters = memory.sink()
    p.dead_letter(letters)
    p.source(files.ndjson(str(tmp_path / "t.jsonl"), schema={"a": pl.Int64})).sink(memory.sink())
    summary = p.run(until_idle=True)
    assert summary.dead_letters == 1
    assert letters.frame().select("stage", "offset", "payload").to_dicts() == [
        {"stage": "parse", "offset": "1", "payload": "nope"}]
