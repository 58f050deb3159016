"""OpenTelemetry metrics: the meter provider (OTEL_METRICS_EXPORTER, a Prometheus scrape
reader) and the Prometheus text rendering behind `/metrics`."""
from __future__ import annotations

import logging
import math
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

from streamfn._optional import import_optional
from streamfn.errors import ConfigError
from streamfn.observe import tracing

log = logging.getLogger("streamfn.observe")

#: batch latency buckets, seconds: a batch takes from well under a millisecond to seconds
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SIZE_BUCKETS_BYTES = (1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9)
#: the counters and gauges read on collection (see Instruments.observables)
OBSERVABLES = ("streamfn.records.in", "streamfn.records.out", "streamfn.records.errors", "streamfn.dead_letters",
               "streamfn.consumer.lag", "streamfn.watermark.delay", "streamfn.state.keys", "streamfn.lanes.open")


def metrics_wanted() -> bool:
    """True when OTEL_METRICS_EXPORTER names an exporter."""
    names = [n.strip().lower() for n in os.environ.get("OTEL_METRICS_EXPORTER", "").split(",") if n.strip()]
    return not tracing.sdk_disabled() and any(n != "none" for n in names)


def env_metric_readers() -> tuple[list[Any], bool]:
    """Readers for OTEL_METRICS_EXPORTER, and whether it asked for a Prometheus endpoint."""
    names = [n.strip().lower() for n in os.environ.get("OTEL_METRICS_EXPORTER", "").split(",") if n.strip()]
    if tracing.sdk_disabled():
        return [], False
    readers: list[Any] = []
    prometheus = False
    for name in names:
        if name == "none":
            continue
        if name == "prometheus":
            prometheus = True
            continue
        export = import_optional("opentelemetry.sdk.metrics.export", extra="otel")
        if name == "console":
            exporter = export.ConsoleMetricExporter(out=sys.stdout)
        elif name == "otlp":
            exporter = tracing.otlp_exporter("METRICS", "metric")()
        else:
            raise ConfigError(f"OTEL_METRICS_EXPORTER: unknown exporter {name!r}; "
                              "use console, otlp, prometheus or none")
        readers.append(export.PeriodicExportingMetricReader(exporter))
    return readers, prometheus


def scrape_reader() -> Any:
    """A pull reader that `/metrics` collects from on each scrape."""
    export = import_optional("opentelemetry.sdk.metrics.export", extra="otel")
    return export.InMemoryMetricReader()


def meter_provider(pipeline: str, readers: Sequence[Any]) -> Any:
    """A MeterProvider over these readers, with the pipeline's resource."""
    sdk = import_optional("opentelemetry.sdk.metrics", extra="otel")
    return sdk.MeterProvider(metric_readers=list(readers), resource=tracing.resource(pipeline))


class Instruments:
    """The instruments streamfn records to; one set per meter provider."""

    def __init__(self, provider: Any) -> None:
        meter = provider.get_meter("streamfn")
        self.meter = meter
        self.batch_duration = meter.create_histogram(
            "streamfn.batch.duration", unit="s", description="Time a stage or sink spent on one batch",
            explicit_bucket_boundaries_advisory=list(LATENCY_BUCKETS_S))
        self.checkpoint_duration = meter.create_histogram(
            "streamfn.checkpoint.duration", unit="s", description="Time a lane took to flush, save state and commit",
            explicit_bucket_boundaries_advisory=list(LATENCY_BUCKETS_S))
        self.checkpoint_size = meter.create_histogram(
            "streamfn.checkpoint.size", unit="By", description="Bytes of state a lane's checkpoint wrote",
            explicit_bucket_boundaries_advisory=list(SIZE_BUCKETS_BYTES))

    def observables(self, callbacks: dict[str, Any]) -> None:
        """Register the counters and gauges read from the run's own counts on each collection.

        Records in/out and errors are counted by the lanes anyway; reading those counts when
        a scrape comes costs nothing per batch, unlike an `add` per stage per batch.
        """
        counters = {
            "streamfn.records.in": "Records that entered a node (a source: records read)",
            "streamfn.records.out": "Records a node emitted (a sink: records written)",
            "streamfn.records.errors": "Records that failed in a node (a source: could not be parsed)",
            "streamfn.dead_letters": "Records sent to the dead-letter sink",
        }
        for name, description in counters.items():
            self.meter.create_observable_counter(name, callbacks=[callbacks[name]], unit="{record}",
                                                 description=description)
        specs = {
            "streamfn.consumer.lag": ("{record}", "Records a partition is behind the end of its source"),
            "streamfn.watermark.delay": ("s", "Wall-clock time minus the lane's event-time watermark"),
            "streamfn.state.keys": ("{key}", "Keys held by a stage's state store"),
            "streamfn.lanes.open": ("{lane}", "Lanes (source partitions) open in this process"),
        }
        for name, (unit, description) in specs.items():
            self.meter.create_observable_gauge(name, callbacks=[callbacks[name]], unit=unit,
                                               description=description)


# -- Prometheus text format ----------------------------------------------------------------
_BAD = re.compile(r"[^a-zA-Z0-9_:]")
_UNITS = {"s": "seconds", "ms": "milliseconds", "By": "bytes", "1": "ratio"}


def prometheus_name(name: str, unit: str) -> str:
    """An OTel name and unit as a Prometheus metric name (`streamfn.batch.duration`, s ->
    `streamfn_batch_duration_seconds`)."""
    base = _BAD.sub("_", name)
    suffix = _UNITS.get(unit or "", "") if not (unit or "").startswith("{") else ""
    if suffix and not base.endswith("_" + suffix):
        base = f"{base}_{suffix}"
    return base


def _labels(attributes: Any, extra: dict[str, str] | None = None) -> str:
    pairs = {_BAD.sub("_", str(k)): str(v) for k, v in (attributes or {}).items()}
    if extra:
        pairs.update(extra)
    if not pairs:
        return ""
    body = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(pairs.items()))
    return "{" + body + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if isinstance(value, float):
        if math.isinf(value):
            return "+Inf" if value > 0 else "-Inf"
        if math.isnan(value):
            return "NaN"
        return repr(value)
    return str(value)


def render_prometheus(metrics_data: Any) -> str:
    """Metrics an OTel reader collected, in the Prometheus text exposition format 0.0.4."""
    if metrics_data is None:
        return ""
    families: dict[str, tuple[str, str, list[str]]] = {}
    for rm in metrics_data.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                _family(metric, families)
    out: list[str] = []
    for name, (kind, help_text, lines) in families.items():
        out.append(f"# HELP {name} {help_text.replace(chr(10), ' ')}")
        out.append(f"# TYPE {name} {kind}")
        out.extend(lines)
    return "\n".join(out) + ("\n" if out else "")


def _family(metric: Any, families: dict[str, tuple[str, str, list[str]]]) -> None:
    kind_name = type(metric.data).__name__  # Sum, Gauge, Histogram
    name = prometheus_name(metric.name, metric.unit)
    if kind_name == "Histogram":
        lines = families.setdefault(name, ("histogram", metric.description, []))[2]
        for point in metric.data.data_points:
            cumulative = 0
            for bound, count in zip(list(point.explicit_bounds) + [math.inf], point.bucket_counts):
                cumulative += count
                lines.append(f"{name}_bucket{_labels(point.attributes, {'le': _number(float(bound))})} {cumulative}")
            lines.append(f"{name}_sum{_labels(point.attributes)} {_number(point.sum)}")
            lines.append(f"{name}_count{_labels(point.attributes)} {point.count}")
        return
    counter = kind_name == "Sum" and metric.data.is_monotonic
    if counter and not name.endswith("_total"):  # text format 0.0.4: TYPE and samples both say _total
        name += "_total"
    lines = families.setdefault(name, ("counter" if counter else "gauge", metric.description, []))[2]
    for point in metric.data.data_points:
        lines.append(f"{name}{_labels(point.attributes)} {_number(point.value)}")
