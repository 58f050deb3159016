"""Property: a pipeline's result does not depend on how its input is cut into batches."""
from __future__ import annotations

import polars as pl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal

import streamfn as sf
from streamfn.connectors import memory

ticks = st.lists(
    st.tuples(st.sampled_from(["A", "B", "C"]), st.integers(0, 1_000), st.floats(1, 100), st.integers(0, 50)),
    min_size=0, max_size=120,
).map(lambda rows: pl.DataFrame(rows, schema={"symbol": pl.String, "ts": pl.Int64, "price": pl.Float64,
                                              "volume": pl.Int64}, orient="row"))


def split_at(frame: pl.DataFrame, cuts: list[int]) -> list[pl.DataFrame]:
    bounds = sorted({0, frame.height, *(c % (frame.height + 1) for c in cuts)})
    return [frame.slice(a, b - a) for a, b in zip(bounds, bounds[1:])]


def run(parts: dict[str, list[pl.DataFrame]], batch_rows: int, run_dir: str) -> pl.DataFrame:
    p = sf.Pipeline("prop", run_dir=run_dir, batch_rows=batch_rows)
    src = p.source(memory.source(parts))

    @p.stage(src)
    def clean(df):
        return df.filter(pl.col("volume") > 0)

    @clean.stage()
    def notional(df):
        return df.with_columns(notional=pl.col("price") * pl.col("volume"))

    out = memory.sink()
    notional.sink(out)
    p.run(until_idle=True, handle_signals=False)
    frame = out.frame()
    if frame.height == 0:
        return pl.DataFrame(schema={"symbol": pl.String, "ts": pl.Int64, "price": pl.Float64,
                                    "volume": pl.Int64, "notional": pl.Float64})
    return frame.sort("symbol", "ts", "price", "volume")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(df=ticks, cuts=st.lists(st.integers(0, 300), max_size=8), batch_rows=st.integers(1, 50),
       lanes=st.integers(1, 3))
def test_results_ignore_batch_boundaries_and_lanes(tmp_path, df, cuts, batch_rows, lanes):
    whole = run({"0": [df]}, 100_000, str(tmp_path / "a"))
    pieces = split_at(df, cuts)
    spread = {str(k): pieces[k::lanes] for k in range(lanes)}
    assert_frame_equal(whole, run(spread, batch_rows, str(tmp_path / "b")))
