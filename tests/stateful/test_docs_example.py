"""The complete example of docs/state.md runs as written (paths moved into a temporary folder)."""
from __future__ import annotations

import os
import re
import runpy

import polars as pl

from tests.stateful.test_crash import direct
from tests.stateful.test_rekey import write_spread_ticks

DOC = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "state.md")


def test_state_docs_example(tmp_path, monkeypatch):
    with open(DOC) as f:
        code = re.search(r"```python\n(.*?)```", f.read(), re.S).group(1)
    code = code.replace("s3://my-bucket/checkpoints/vwap", str(tmp_path / "checkpoints"))
    df = write_spread_ticks(str(tmp_path / "data"), n=20_000, parts=3)
    (tmp_path / "example.py").write_text(code)
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(tmp_path / "example.py"), run_name="__main__")
    got = pl.read_parquet(str(tmp_path / "out" / "vwap" / "*.parquet"))
    want = direct(df)
    assert got.height == want.height
    joined = got.join(want, on=["symbol", "window_start"], suffix="_want")
    assert (joined["count"] == joined["count_want"]).all() and (joined["volume"] == joined["volume_want"]).all()
    totals = pl.read_parquet(str(tmp_path / "out" / "totals" / "*.parquet"))  # running: the largest is the last
    final = totals.group_by("symbol").agg(pl.col("total_volume").max())
    assert final["total_volume"].sum() == df.filter(pl.col("volume") > 0)["volume"].sum()
    assert final.height == df["symbol"].n_unique()
