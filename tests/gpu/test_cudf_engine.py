"""On a GPU machine: the cudf and polars-GPU paths give the CPU path's results, and detection finds
the device. Collected only with STREAMFN_REQUIRE_GPU=1 (see conftest.py); every test is marked gpu."""
from __future__ import annotations

import polars as pl
import pytest

import streamfn as sf
from streamfn import gpu
from streamfn.connectors import memory

pytestmark = pytest.mark.gpu

TICKS = pl.DataFrame({"symbol": [f"S{i % 37:02d}" for i in range(20_000)],
                      "ts": list(range(20_000)),
                      "price": [10.0 + (i % 997) / 7 for i in range(20_000)],
                      "volume": [(i * 7919) % 20_000 for i in range(20_000)]})


def run(engine: str, stage) -> pl.DataFrame:
    p = sf.Pipeline(f"gpu_{engine}")
    src = p.source(memory.source(TICKS, batch_rows=5_000))
    out = memory.sink()
    p.stage(src, engine=engine, name="w")(stage).sink(out)
    p.run(until_idle=True, handle_signals=False)
    return out.frame().sort("symbol", "window_start")


def windows_polars(df: pl.DataFrame) -> pl.DataFrame:
    return (df.filter(pl.col("volume") > 0)
              .with_columns((pl.col("ts") // 1000 * 1000).alias("window_start"),
                            (pl.col("price") * pl.col("volume")).alias("pv"))
              .group_by("symbol", "window_start")
              .agg(pl.len().cast(pl.Int64).alias("count"), pl.col("volume").sum(), pl.col("pv").sum()))


def windows_cudf(df: "cudf.DataFrame") -> "cudf.DataFrame":  # noqa: F821
    df = df[df["volume"] > 0]
    df["window_start"] = df["ts"] // 1000 * 1000
    df["pv"] = df["price"] * df["volume"]
    out = df.groupby(["symbol", "window_start"], as_index=False).agg(
        count=("volume", "count"), volume=("volume", "sum"), pv=("pv", "sum"))
    out["count"] = out["count"].astype("int64")
    return out


def test_detection_finds_the_device() -> None:
    status = gpu.detect(refresh=True)
    assert status.cudf and status.device, status.reason


def test_cudf_stage_matches_the_cpu() -> None:
    expected = run("cpu", windows_polars)
    got = run("gpu", windows_cudf)
    assert got.columns == expected.columns
    assert got.select("symbol", "window_start", "count", "volume").equals(
        expected.select("symbol", "window_start", "count", "volume"))
    assert (got["pv"] - expected["pv"]).abs().max() < 1e-6 * expected["pv"].abs().max()


def test_engine_gpu_binds_cudf() -> None:
    p = sf.Pipeline("bind")
    node = p.stage(p.source(memory.source(TICKS)), engine="gpu", name="w")(windows_cudf)
    assert gpu.bind_stage(node)[0] == "gpu-cudf"


def test_polars_stage_on_the_gpu_runs_or_says_why() -> None:
    """With cudf-polars: identical results; without it (polars 2.x): a clear error at start."""
    expected = run("cpu", windows_polars)
    if gpu.detect().polars_gpu:
        assert run("gpu", windows_polars).equals(expected)
        return
    with pytest.raises(sf.ConfigError, match="polars' GPU engine needs cudf-polars"):
        run("gpu", windows_polars)
    assert run("auto", windows_polars).equals(expected)
