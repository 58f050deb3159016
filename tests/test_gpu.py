"""GPU engine selection on a machine without a GPU: detection, fallback, the start-up error, and
results identical to the CPU path. The GPU paths themselves are tested in tests/gpu/ (GPU only)."""
from __future__ import annotations

import logging
import os
import subprocess
import sys

import pandas as pd
import polars as pl
import pytest

import streamfn as sf
from streamfn import gpu
from streamfn.connectors import memory
from streamfn.errors import ConfigError

TICKS = pl.DataFrame({"symbol": ["A", "B", "A", "C", "B", "A"] * 50,
                      "price": [10.0, 20.5, 11.0, 7.25, 21.0, 12.5] * 50,
                      "volume": [100, 0, 300, 50, 0, 200] * 50})


@pytest.fixture(autouse=True)
def fresh_detection(monkeypatch):
    """Every test sees this machine as it is (no GPU), detected anew."""
    monkeypatch.delenv("STREAMFN_DISABLE_GPU", raising=False)
    gpu.detect(refresh=True)
    yield
    gpu.detect(refresh=True)


def run(engine: str, stage, run_dir: str) -> pl.DataFrame:
    p = sf.Pipeline(f"gpu_{engine}", run_dir=run_dir)
    src = p.source(memory.source(TICKS, batch_rows=64))
    out = memory.sink()
    p.stage(src, engine=engine, name="vwap")(stage).sink(out)
    p.run(until_idle=True, handle_signals=False)
    return out.frame().sort("symbol")


def vwap_polars(df: pl.DataFrame) -> pl.DataFrame:
    return (df.filter(pl.col("volume") > 0)
              .with_columns((pl.col("price") * pl.col("volume")).alias("pv")))


def vwap_lazy(df: pl.LazyFrame) -> pl.LazyFrame:
    return (df.filter(pl.col("volume") > 0)
              .with_columns((pl.col("price") * pl.col("volume")).alias("pv")))


def vwap_cudf(df: "cudf.DataFrame") -> "cudf.DataFrame":  # noqa: F821 - cudf may be absent
    df = df[df["volume"] > 0]
    df["pv"] = df["price"] * df["volume"]
    return df


def test_detection_says_why_there_is_no_gpu() -> None:
    status = gpu.detect()
    assert not status.usable and not status.cudf and not status.polars_gpu
    assert "cudf" in status.reason and "streamfn[gpu]" in status.reason
    assert gpu.detect() is status  # once per process


def test_detection_can_be_disabled(monkeypatch) -> None:
    monkeypatch.setenv("STREAMFN_DISABLE_GPU", "1")
    assert gpu.detect(refresh=True).reason == "the GPU is disabled by STREAMFN_DISABLE_GPU"


def test_hidden_devices_are_reported(monkeypatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert gpu._device() == (None, "CUDA_VISIBLE_DEVICES='' hides every device")


@pytest.mark.parametrize("fn, api", [(vwap_polars, "polars"), (vwap_lazy, "lazy"), (vwap_cudf, "cudf")])
def test_the_stage_api_comes_from_the_annotation(fn, api) -> None:
    assert gpu.stage_api(fn) == api


def test_engine_gpu_without_a_gpu_fails_at_start(run_dir) -> None:
    p = sf.Pipeline("needs_gpu", run_dir=run_dir)
    opened = []

    class Watched(memory.MemorySource):
        def open(self, partition, resume):
            opened.append(partition)
            return super().open(partition, resume)

    src = p.source(Watched(TICKS))
    out = memory.sink()
    p.stage(src, engine="gpu", name="vwap")(vwap_polars).sink(out)
    with pytest.raises(ConfigError, match=r"stage 'vwap' asks for engine='gpu' but cannot run on a GPU here: "
                                          r"neither cudf nor cudf-polars is installed.*use engine='auto'") as info:
        p.run(until_idle=True, handle_signals=False)
    assert "\n" not in str(info.value)
    assert opened == []  # no lane was opened


@pytest.mark.parametrize("fn", [vwap_polars, vwap_lazy, vwap_cudf])
def test_auto_falls_back_to_the_cpu_with_identical_results(fn, run_dir, caplog) -> None:
    expected = run("cpu", vwap_polars, run_dir + "/cpu")
    with caplog.at_level(logging.INFO, logger="streamfn.gpu"):
        got = run("auto", fn, run_dir + "/auto")
    assert got.equals(expected)
    fallbacks = [r for r in caplog.records if r.getMessage() == "GPU not used; the stage runs on the CPU"]
    assert len(fallbacks) == 1  # once, though the run had several batches
    assert fallbacks[0].stage == "vwap" and "cudf" in fallbacks[0].reason
    assert fallbacks[0].engine == ("cpu-pandas" if fn is vwap_cudf else "cpu")


def test_a_cudf_stage_on_the_cpu_runs_on_pandas_and_dead_letters_bad_rows(run_dir) -> None:
    def strict(df: "cudf.DataFrame") -> "cudf.DataFrame":  # noqa: F821
        assert isinstance(df, pd.DataFrame)  # the CPU stand-in for cudf
        if (df["price"] > 20).any():
            raise ValueError("price too high")
        return df

    got = run("auto", strict, run_dir)
    assert got.height == TICKS.filter(pl.col("price") <= 20).height
    letters = pl.concat([pl.read_ndjson(os.path.join(root, f))
                         for root, _, files in os.walk(run_dir) for f in files if f.endswith(".jsonl")])
    assert letters.height == 100 and set(letters["stage"]) == {"vwap"}


def test_the_engine_used_is_on_the_runner(run_dir) -> None:
    p = sf.Pipeline("engines", run_dir=run_dir)
    src = p.source(memory.source(TICKS))
    node = p.stage(src, engine="auto", name="vwap")(vwap_cudf)
    node.sink(memory.sink())
    assert gpu.bind_stage(node)[0] == "cpu-pandas"
    assert gpu.plan_engine(node)[0] == "cpu-pandas"


def test_polars_gpu_engine_is_not_used_without_cudf_polars() -> None:
    """polars' own GPU engine raises without cudf-polars; streamfn never calls it then."""
    lf = pl.LazyFrame({"a": [1, 2]})
    with pytest.raises(ModuleNotFoundError):
        lf.collect(engine="gpu")
    assert gpu.collect(lf, gpu=False).equals(lf.collect())


def test_gpu_tests_are_not_collected_without_a_gpu() -> None:
    """tests/gpu/ runs only with STREAMFN_REQUIRE_GPU=1 (on a GPU machine); CI does not select it."""
    env = {k: v for k, v in os.environ.items() if k != "STREAMFN_REQUIRE_GPU"}
    here = os.path.dirname(__file__)
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", os.path.join(here, "gpu")],
                          env=env, capture_output=True, text=True, timeout=120, cwd=os.path.dirname(here))
    assert "no tests collected" in done.stdout, done.stdout[-1000:]
