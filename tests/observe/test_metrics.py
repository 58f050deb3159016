"""Metric points from a real run, and the Prometheus scrape parsed as Prometheus text."""
from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

import polars as pl
from prometheus_client.parser import text_string_to_metric_families

import streamfn as sf
from streamfn import observe
from streamfn.batch import Batch
from streamfn.connectors import memory
from streamfn.contracts import StageRunner
from streamfn.observe.metrics import prometheus_name, render_prometheus
from streamfn.observe.status import prometheus_address
from tests.observe.conftest import LiveRun, get, tick_pipeline, wait_for


def points(reader: Any) -> dict[str, list[tuple[dict[str, Any], Any]]]:
    """Metric name -> (attributes, data point) from one collection."""
    out: dict[str, list[tuple[dict[str, Any], Any]]] = defaultdict(list)
    data = reader.get_metrics_data()
    for rm in data.resource_metrics if data else ():
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                for point in metric.data.data_points:
                    out[metric.name].append((dict(point.attributes), point))
    return out


def value(found: dict[str, list[tuple[dict[str, Any], Any]]], name: str, **attrs: str) -> Any:
    """The one point of `name` whose attributes include `attrs`."""
    matching = [p for a, p in found[name] if all(a.get(k) == v for k, v in attrs.items())]
    assert len(matching) == 1, (name, attrs, found[name])
    return matching[0]


def _failing_pipeline(run_dir: str) -> sf.Pipeline:
    p = sf.Pipeline("metered", run_dir=run_dir)
    data = {"a": [pl.DataFrame({"x": range(0, 50)}), pl.DataFrame({"x": range(50, 80)})],
            "b": [pl.DataFrame({"x": range(80, 100)})]}
    nums = p.source(memory.source(data, name="nums"))

    @p.stage(nums)
    def picky(df: pl.DataFrame) -> pl.DataFrame:
        if (df["x"] % 25 == 7).any():  # rows 7, 32, 57, 82 fail: they go to the dead letters
            raise ValueError("no sevens")
        return df

    @p.stage(picky)
    def small(df: pl.DataFrame) -> pl.DataFrame:
        return df.filter(pl.col("x") < 60)

    small.sink(memory.sink(name="out"))
    return p


def test_metric_points_of_a_finished_run(run_dir, metric_reader):
    p = _failing_pipeline(run_dir)
    with observe.start(p, metric_readers=[metric_reader]):
        summary = p.run(until_idle=True)
        found = points(metric_reader)
    for node in ("nums", "picky", "small", "out"):
        assert value(found, "streamfn.records.in", stage=node).value == summary.rows_in(node)
        assert value(found, "streamfn.records.out", stage=node).value == summary.rows_out(node)
    assert summary.rows_out("picky") == 96 and summary.rows_out("out") == 57
    assert value(found, "streamfn.records.in", stage="picky", engine="cpu", kind="stage").value == 100
    assert value(found, "streamfn.records.errors", stage="picky").value == 4
    assert value(found, "streamfn.dead_letters", pipeline="metered").value == 4
    assert value(found, "streamfn.batch.duration", stage="picky").count == 3  # one point per batch
    assert value(found, "streamfn.batch.duration", stage="out").count == 2  # partition b: all filtered
    checkpoints = value(found, "streamfn.checkpoint.duration", pipeline="metered")
    assert checkpoints.count >= 2 and checkpoints.sum > 0  # at least each lane's final commit
    assert value(found, "streamfn.lanes.open", pipeline="metered").value == 0


class _KeyCounter(StageRunner):
    """A stateful stage in miniature: reports its keys and watermark the way streamfn.stateful does."""

    def __init__(self, node: Any, lane: Any) -> None:
        self.node, self.lane, self.keys = node, lane, 0

    def process(self, frame: pl.DataFrame, batch: Batch) -> pl.DataFrame:
        self.keys = max(self.keys, int(frame["seq"].max()) % 50 + 1)
        self.lane.obs.state_keys(self.lane, self.node.name, "by_seq", self.keys)
        self.lane.obs.watermark(self.lane, int(time.time() * 1000) - 60_000)
        return frame.with_columns(double=pl.col("volume") * 2)


def test_live_gauges_lag_watermark_delay_and_state_keys(run_dir, metric_reader):
    run = LiveRun(run_dir, make=lambda d: tick_pipeline(d, runner=_KeyCounter), metric_readers=[metric_reader])
    try:
        run.wait_flowing()
        found = points(metric_reader)
        for partition in ("0", "1"):
            lag = value(found, "streamfn.consumer.lag", source="ticks", partition=partition)
            assert lag.value == 1_500  # what the source reported through ctx.report_lag
            assert value(found, "streamfn.watermark.delay", lane=f"ticks[{partition}]").value >= 59
        keys = value(found, "streamfn.state.keys", stage="enrich", store="by_seq").value
        assert 2 <= keys <= 100  # summed over the two lanes
        assert value(found, "streamfn.lanes.open", pipeline="live").value == 2
    finally:
        run.stop()


def _families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_prometheus_scrape_after_a_run_matches_the_summary(run_dir):
    p = _failing_pipeline(run_dir)
    with observe.start(p, metrics_port=0) as obs:
        summary = p.run(until_idle=True)
        code, ctype, body = get(obs.url + "/metrics")
    assert code == 200 and ctype.startswith("text/plain; version=0.0.4")
    families = _families(body.decode())
    records_in = families["streamfn_records_in"]
    assert records_in.type == "counter"
    samples = {s.labels["stage"]: s.value for s in records_in.samples if s.name == "streamfn_records_in_total"}
    assert samples == {n: float(summary.rows_in(n)) for n in ("nums", "picky", "small", "out")}
    errors = {s.labels["stage"]: s.value for s in families["streamfn_records_errors"].samples}
    assert errors == {"nums": 0.0, "picky": 4.0, "small": 0.0, "out": 0.0}
    assert [s.value for s in families["streamfn_dead_letters"].samples] == [4.0]
    duration = families["streamfn_batch_duration_seconds"]
    assert duration.type == "histogram"
    count = next(s for s in duration.samples
                 if s.name.endswith("_count") and s.labels["stage"] == "picky")
    inf = next(s for s in duration.samples
               if s.name.endswith("_bucket") and s.labels["stage"] == "picky" and s.labels["le"] == "+Inf")
    assert count.value == inf.value == 3


def test_prometheus_scrape_of_a_live_run_shows_lag_per_partition(live_run):
    live_run.wait_flowing()

    def lag_samples() -> dict[str, float] | None:
        families = _families(get(live_run.url + "/metrics")[2].decode())
        lag = families.get("streamfn_consumer_lag")
        found = {s.labels["partition"]: s.value for s in lag.samples} if lag else {}
        return found if len(found) == 2 else None
    assert wait_for(lag_samples, what="lag of both partitions") == {"0": 1500.0, "1": 1500.0}
    families = _families(get(live_run.url + "/metrics")[2].decode())
    flowing = {s.labels["stage"]: s.value for s in families["streamfn_records_out"].samples}
    assert set(flowing) == {"ticks", "clean", "enrich", "out"} and all(v > 0 for v in flowing.values())


def test_prometheus_text_escapes_labels_and_names():
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    counter = provider.get_meter("t").create_counter("odd.name-here", unit="{thing}")
    counter.add(3, {"stage": 'a "quoted"\nname\\x', "le.vel": "1"})
    families = _families(render_prometheus(reader.get_metrics_data()))
    (sample,) = families["odd_name_here"].samples
    assert sample.labels == {"stage": 'a "quoted"\nname\\x', "le_vel": "1"} and sample.value == 3.0
    provider.shutdown()
    assert prometheus_name("streamfn.checkpoint.size", "By") == "streamfn_checkpoint_size_bytes"
    assert prometheus_name("streamfn.batch.duration", "s") == "streamfn_batch_duration_seconds"


def test_prometheus_address_follows_the_standard_variables(monkeypatch):
    monkeypatch.delenv("OTEL_EXPORTER_PROMETHEUS_HOST", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_PROMETHEUS_PORT", raising=False)
    assert prometheus_address(None, None) == ("127.0.0.1", 9464)
    monkeypatch.setenv("OTEL_EXPORTER_PROMETHEUS_PORT", "9999")
    assert prometheus_address(None, None) == ("127.0.0.1", 9999)
    assert prometheus_address("0.0.0.0", 1234) == ("0.0.0.0", 1234)


def test_console_metrics_exporter_from_the_environment(run_dir, monkeypatch, capfd):
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "console")
    _failing_pipeline(run_dir).run(until_idle=True)
    out = capfd.readouterr().out
    assert '"name": "streamfn.records.in"' in out


def test_one_observation_over_two_runs_reports_the_current_run(run_dir, metric_reader):
    p = sf.Pipeline("twice", run_dir=run_dir)
    p.source(memory.source(pl.DataFrame({"x": range(30)}), name="nums")).sink(memory.sink(name="out"))
    with observe.start(p, metric_readers=[metric_reader]):
        p.run(until_idle=True)
        assert value(points(metric_reader), "streamfn.records.out", stage="out").value == 30
        second = p.run(until_idle=True)  # value() checks there is one series, the second run's
        assert value(points(metric_reader), "streamfn.records.out", stage="out").value == second.rows_out("out")


def test_otlp_metrics_exporter_from_the_standard_environment_variables(run_dir, monkeypatch, otlp_collector):
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", otlp_collector.url)
    summary = _failing_pipeline(run_dir).run(until_idle=True)  # the run's end flushes the exporter
    sent: dict[tuple[str, str], float] = {}
    for path, body in otlp_collector.received:
        assert path == "/v1/metrics"
        for rm in ExportMetricsServiceRequest.FromString(body).resource_metrics:
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    if metric.name == "streamfn.records.out":
                        for point in metric.sum.data_points:
                            stage = next(a.value.string_value for a in point.attributes if a.key == "stage")
                            sent[(metric.name, stage)] = point.as_int
    assert sent == {("streamfn.records.out", n): summary.rows_out(n) for n in ("nums", "picky", "small", "out")}
