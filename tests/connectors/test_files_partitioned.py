"""files.parquet(..., partition_by=[...]): Hive folders, read back by polars and pyarrow; overwrite=True."""
from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import polars as pl
import pyarrow.dataset as ds
import pytest
from polars.testing import assert_frame_equal

import streamfn as sf
from streamfn.connectors import files, memory
from streamfn.errors import ConfigError

DAYS = [dt.date(2026, 3, 2), dt.date(2026, 3, 3)]
SYMBOLS = ["AAPL", "BRK.B", "A/B c%", None]  # a dot, a slash, a space, a percent sign, a null


def rows(n: int, offset: int = 0) -> pl.DataFrame:
    ids = list(range(offset, offset + n))
    return pl.DataFrame({"id": ids, "date": [DAYS[i % 2] for i in ids], "symbol": [SYMBOLS[i // 2 % 4] for i in ids],
                         "price": [i / 8 for i in ids]}, schema={"id": pl.Int64, "date": pl.Date,
                                                                  "symbol": pl.String, "price": pl.Float64})


def three_lanes(n: int) -> dict[str, list[pl.DataFrame]]:
    """n rows in three partitions (three lanes), a few batches each."""
    frame = rows(n)
    return {str(k): [frame.filter(pl.col("id") % 3 == k).slice(i, 40) for i in range(0, n, 40)] for k in range(3)}


def run(out: Path, run_dir: Path, data: object, **kw: object) -> None:
    p = sf.Pipeline("hive", run_dir=str(run_dir), checkpoint_interval="0.1s")
    p.source(memory.source(data)).sink(files.parquet(str(out), partition_by=["date", "symbol"], **kw))
    p.run(until_idle=True)


def test_hive_folders_read_back_by_polars_and_pyarrow(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run(out, tmp_path / "run", three_lanes(600))
    folders = sorted(str(p.relative_to(out)) for p in out.glob("*/*") if p.is_dir())
    assert folders == sorted(f"date={d}/symbol={s}" for d in DAYS for s in
                             ("AAPL", "BRK.B", "A%2FB%20c%25", "__HIVE_DEFAULT_PARTITION__"))
    # the partition columns are the folders, not columns of the files
    one = next(out.glob("date=*/symbol=AAPL/*.parquet"))
    assert pl.read_parquet(one).columns == ["id", "price"]
    want = rows(600).sort("id")
    got = pl.read_parquet(out / "**" / "*.parquet", hive_partitioning=True,
                          hive_schema={"date": pl.Date, "symbol": pl.String}).sort("id")
    assert_frame_equal(got.select(want.columns), want)
    table = ds.dataset(str(out), format="parquet", partitioning="hive").to_table()
    from_arrow = pl.from_arrow(table).sort("id")
    assert from_arrow["id"].to_list() == want["id"].to_list()
    assert from_arrow["symbol"].to_list() == want["symbol"].to_list()  # decoded, null included
    assert from_arrow["date"].cast(pl.String).to_list() == want["date"].cast(pl.String).to_list()


def test_files_appear_whole_at_commits_and_a_failed_run_leaves_none(tmp_path: Path) -> None:
    out = tmp_path / "out"
    seen: list[str] = []
    p = sf.Pipeline("hive_fail", run_dir=str(tmp_path / "run"), batch_rows=50, checkpoint_interval="1h",
                    max_dead_letters=0)
    src = p.source(memory.source(rows(300), batch_rows=50))

    @p.stage(src)
    def look(df: pl.DataFrame) -> pl.DataFrame:
        seen.extend(name for _, _, names in os.walk(out) for name in names)
        if df["id"][0] >= 200:
            raise ValueError("boom")
        return df

    look.sink(files.parquet(str(out), partition_by=["symbol"]))
    with pytest.raises(sf.StreamfnError):
        p.run(until_idle=True)
    assert seen and all(name.startswith(".") and name.endswith(".tmp") for name in seen)  # nothing published
    assert [name for _, _, names in os.walk(out) for name in names] == []  # and nothing left


def test_overwrite_replaces_the_earlier_output_and_append_keeps_it(tmp_path: Path) -> None:
    out = tmp_path / "out"
    for i in range(2):
        run(out, tmp_path / "run", rows(100, offset=i * 1000), overwrite=True)
    got = pl.read_parquet(out / "**" / "*.parquet", hive_partitioning=True)
    assert got["id"].sort().to_list() == list(range(1000, 1100))
    run(out, tmp_path / "run", rows(100, offset=5000))  # default: append
    assert pl.read_parquet(out / "**" / "*.parquet").height == 200


def test_bad_partition_columns_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="list of column names"):
        files.parquet(str(tmp_path), partition_by="date")  # type: ignore[arg-type]
    p = sf.Pipeline("hive_bad", run_dir=str(tmp_path / "run"))
    p.source(memory.source(rows(10))).sink(files.parquet(str(tmp_path / "out"), partition_by=["day"]))
    with pytest.raises(ConfigError, match=r"partition_by=\['day'\]"):
        p.run(until_idle=True)
