"""What observability costs: the file job with tracing and metrics off vs on, and the hooks alone.

    python bench/observe_overhead.py [--rows 1000000] [--repeats 5] [--batch-rows 100000 2000]

The job: NDJSON ticks -> parse -> filter volume > 0 -> derived column -> memory sink. Modes:
off (no observe.start: the runtime's no-op observer), tracing (a span per batch per stage,
batched to an exporter that drops them), metrics (an in-memory reader), both. Prints one
JSON line per batch size with the best and median rows/s of each mode, then the per-batch cost of
the observer hooks alone in microseconds.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from typing import Any

import numpy as np
import polars as pl
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

import streamfn as sf
from streamfn import observe
from streamfn.batch import Batch
from streamfn.connectors import files, memory
from streamfn.lane import Lane
from streamfn.observe.observer import Observer
from streamfn.observe.telemetry import TelemetryObserver
from streamfn.runtime import Runtime

SCHEMA = {"symbol": pl.String, "ts": pl.Int64, "price": pl.Float64, "volume": pl.Int64}
MODES = ("off", "tracing", "metrics", "both")


class _Drop(SpanExporter):
    def export(self, spans: Any) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def write_ticks(path: str, rows: int) -> None:
    """The reference tick shape: 500 symbols, ~5% zero volume."""
    rng = np.random.default_rng(7)
    volume = np.where(rng.random(rows) < 0.05, 0, rng.integers(1, 20_000, rows))
    pl.DataFrame({
        "symbol": [f"SYM{i:03d}" for i in rng.integers(0, 500, rows)],
        "ts": 1_700_000_000_000 + np.arange(rows) // 100,
        "price": np.round(rng.uniform(10, 1000, rows), 4), "volume": volume,
    }).write_ndjson(path)


def build(path: str, run_dir: str, batch_rows: int) -> sf.Pipeline:
    p = sf.Pipeline("bench", run_dir=run_dir, batch_rows=batch_rows, checkpoint_interval=1000)
    ticks = p.source(files.ndjson(path, schema=SCHEMA), name="ticks")

    @p.stage(ticks)
    def clean(df: pl.DataFrame) -> pl.DataFrame:
        return df.filter(pl.col("volume") > 0)

    @p.stage(clean)
    def notional(df: pl.DataFrame) -> pl.DataFrame:
        return df.with_columns(notional=pl.col("price") * pl.col("volume"))

    notional.sink(memory.sink())
    return p


def run_once(path: str, run_dir: str, mode: str, batch_rows: int) -> float:
    p = build(path, run_dir, batch_rows)
    obs = None
    if mode != "off":
        provider = None
        if mode in ("tracing", "both"):
            provider = TracerProvider()
            provider.add_span_processor(BatchSpanProcessor(_Drop()))
        readers = [InMemoryMetricReader()] if mode in ("metrics", "both") else []
        obs = observe.start(p, tracer_provider=provider, metric_readers=readers)
    started = time.perf_counter()
    summary = p.run(until_idle=True, handle_signals=False)
    wall = time.perf_counter() - started
    if obs is not None:
        obs.close()
    return summary.rows_in("ticks") / wall


def hook_costs(run_dir: str) -> dict[str, float]:
    """Microseconds per batch the lane spends in observer hooks (source + 3 nodes)."""
    p = sf.Pipeline("hooks", run_dir=run_dir)
    src = p.source(memory.source(pl.DataFrame({"x": [1]})), name="ticks")
    a = p.stage(src, name="clean")(lambda df: df)
    p.stage(a, name="notional")(lambda df: df).sink(memory.sink())
    rt = Runtime(p, until_idle=True, settings={}, handle_signals=False)
    assert src.connector is not None
    lane = Lane(rt, rt.sources["ticks"], "0", src.connector.open("0", None), rt.plans["ticks"])  # type: ignore[union-attr]
    batch = Batch(pl.DataFrame({"x": range(2000)}), "ticks", "0", 0, 1999)
    tracer = TracerProvider()
    tracer.add_span_processor(BatchSpanProcessor(_Drop(), max_queue_size=100_000))
    meter = MeterProvider(metric_readers=[InMemoryMetricReader()])
    observers = {"off": Observer(rt),
                 "tracing": TelemetryObserver(rt, tracer_provider=tracer, meter_provider=None),
                 "metrics": TelemetryObserver(rt, tracer_provider=None, meter_provider=meter),
                 "both": TelemetryObserver(rt, tracer_provider=tracer, meter_provider=meter)}
    out = {}
    for mode, obs in observers.items():
        n = 100_000 if mode == "off" else 3_000
        started = time.perf_counter()
        for _ in range(n):
            scope = obs.batch_begin(lane, batch, 0)
            for node in lane.plan:
                stage = obs.stage_begin(lane, node, batch)
                obs.stage_end(stage, lane, node, 2000, 1900, 0.001)
            obs.batch_end(scope)
        out[mode] = round((time.perf_counter() - started) / n * 1e6, 2)
    tracer.shutdown()
    meter.shutdown()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch-rows", type=int, nargs="+", default=[100_000, 2_000])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "ticks.jsonl")
        write_ticks(path, args.rows)
        for batch_rows in args.batch_rows:
            run_once(path, tmp, "off", batch_rows)  # warm-up
            rates: dict[str, list[float]] = {m: [] for m in MODES}
            for _ in range(args.repeats):
                for mode in MODES:  # interleaved, so that load from elsewhere hits every mode alike
                    rates[mode].append(run_once(path, tmp, mode, batch_rows))
            # best-of is what survives load from other processes; the median shows the spread
            print(json.dumps({"rows": args.rows, "batch_rows": batch_rows,
                              **{f"{m}_best_rows_per_s": round(max(v)) for m, v in rates.items()},
                              **{f"{m}_median_rows_per_s": round(statistics.median(v)) for m, v in rates.items()}}))
        print(json.dumps({"hook_us_per_batch": hook_costs(tmp)}))


if __name__ == "__main__":
    main()
