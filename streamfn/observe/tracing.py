"""OpenTelemetry tracing: exporters from the standard OTEL_* variables, and trace context
carried through Kafka message headers and HTTP `traceparent` headers.

Connectors call three helpers, all safe (and cheap) when tracing is off or OpenTelemetry
is not installed:

    headers = inject_headers(headers)              # Kafka sink: once per batch, on every message
    ctx = extract_context(message.headers())       # Kafka / HTTP source: per record or request
    set_batch_contexts([ctx, ...])                 # inside SourcePartition.next_batch
"""
from __future__ import annotations

import importlib
import logging
import os
import sys
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeVar

from streamfn._optional import import_optional
from streamfn.errors import ConfigError

log = logging.getLogger("streamfn.observe")

Carrier = TypeVar("Carrier", list[tuple[str, bytes]], dict[str, str])

_pending = threading.local()  # trace contexts a source handed over for the next batch
_active_runs = 0
_active_lock = threading.Lock()


def tracing_active() -> bool:
    """True while a run in this process records spans (connectors may skip header work otherwise)."""
    return _active_runs > 0


def _run_traced(delta: int) -> None:
    global _active_runs
    with _active_lock:
        _active_runs = max(0, _active_runs + delta)


def _propagate() -> Any:
    try:
        return importlib.import_module("opentelemetry.propagate")
    except ImportError:
        return None


class _HeaderGetter:
    """Reads Kafka headers (a list of (key, bytes) pairs) or HTTP headers (a mapping)."""

    def get(self, carrier: Any, key: str) -> list[str] | None:
        if isinstance(carrier, Mapping):
            for k, v in carrier.items():
                if k.lower() == key:
                    return [_text(v)]
            return None
        found = [_text(v) for k, v in carrier if k.lower() == key and v is not None]
        return found or None

    def keys(self, carrier: Any) -> list[str]:
        if isinstance(carrier, Mapping):
            return [k.lower() for k in carrier]
        return [k.lower() for k, _ in carrier]


def _text(value: str | bytes) -> str:
    return value.decode("latin-1") if isinstance(value, (bytes, bytearray)) else str(value)


def inject_headers(headers: Carrier | None = None, *, context: Any = None) -> Any:
    """Add the current trace context (W3C `traceparent`, `tracestate`) to message headers.

    A list of (key, bytes) pairs (Kafka) gets pairs appended; a dict (HTTP) gets str values;
    None gives a new list. Returns the same object; unchanged when no streamfn run is traced
    (and `context` is not given) or no span is current.
    """
    carrier: Any = [] if headers is None else headers
    propagate = _propagate() if tracing_active() or context is not None else None
    if propagate is None:
        return carrier
    found: dict[str, str] = {}
    propagate.inject(found, context=context)
    if isinstance(carrier, dict):
        carrier.update(found)
    else:
        carrier.extend((k, v.encode("latin-1")) for k, v in found.items())
    return carrier


def extract_context(carrier: Mapping[str, Any] | Sequence[tuple[str, Any]] | None) -> Any:
    """The trace context in Kafka or HTTP headers, or None when there is none (or no OTel)."""
    if not carrier:
        return None
    propagate = _propagate()
    if propagate is None:
        return None
    ctx = propagate.extract(carrier, getter=_HeaderGetter())
    span = importlib.import_module("opentelemetry.trace").get_current_span(ctx)
    return ctx if span.get_span_context().is_valid else None


def set_batch_contexts(contexts: Iterable[Any]) -> None:
    """Say which traces the batch being read continues; call it inside `next_batch`.

    The batch's span becomes a child of the first context and links to the others, so one
    HTTP request or Kafka message can be followed through the stages to the sinks.
    """
    found = [c for c in contexts if c is not None]
    _pending.contexts = found or None


def take_batch_contexts() -> list[Any] | None:
    """The contexts a source set for the batch just read on this thread (and forget them)."""
    found = getattr(_pending, "contexts", None)
    _pending.contexts = None
    return found


# -- providers ------------------------------------------------------------------------------
def _names(variable: str) -> list[str]:
    return [n.strip().lower() for n in os.environ.get(variable, "").split(",") if n.strip()]


def sdk_disabled() -> bool:
    """OTEL_SDK_DISABLED=true turns every signal off."""
    return os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"


def traces_wanted() -> bool:
    """True when OTEL_TRACES_EXPORTER names an exporter."""
    return not sdk_disabled() and any(n != "none" for n in _names("OTEL_TRACES_EXPORTER"))


def resource(pipeline: str) -> Any:
    """The OTel resource: service.name from OTEL_SERVICE_NAME/OTEL_RESOURCE_ATTRIBUTES, else streamfn."""
    res = import_optional("opentelemetry.sdk.resources", extra="otel")
    attributes: dict[str, str] = {"streamfn.pipeline": pipeline}
    if not os.environ.get("OTEL_SERVICE_NAME") and "service.name" not in os.environ.get(
            "OTEL_RESOURCE_ATTRIBUTES", ""):
        attributes["service.name"] = "streamfn"
    return res.Resource.create(attributes)


def _protocol(signal: str) -> str:
    return (os.environ.get(f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL")
            or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf").strip().lower()


def otlp_exporter(signal: str, kind: str) -> Any:
    """The OTLP exporter class for a signal ('TRACES'/'METRICS'; kind 'trace'/'metric')."""
    protocol = _protocol(signal)
    if protocol == "grpc":
        module = import_optional(f"opentelemetry.exporter.otlp.proto.grpc.{kind}_exporter", extra="otel")
    elif protocol in ("http/protobuf", "http"):
        module = import_optional(f"opentelemetry.exporter.otlp.proto.http.{kind}_exporter", extra="otel")
    else:
        raise ConfigError(f"OTEL_EXPORTER_OTLP_PROTOCOL must be 'http/protobuf' or 'grpc', got {protocol!r}")
    return getattr(module, "OTLPSpanExporter" if kind == "trace" else "OTLPMetricExporter")


def tracer_provider_from_env(pipeline: str) -> Any:
    """A TracerProvider exporting as OTEL_TRACES_EXPORTER says, or the application's own, or None."""
    if sdk_disabled():
        return None
    names = [n for n in _names("OTEL_TRACES_EXPORTER") if n != "none"]
    if not names:
        return _application_provider()
    sdk = import_optional("opentelemetry.sdk.trace", extra="otel")
    export = import_optional("opentelemetry.sdk.trace.export", extra="otel")
    provider = sdk.TracerProvider(resource=resource(pipeline))
    for name in names:
        if name == "console":
            exporter = export.ConsoleSpanExporter(out=sys.stdout)  # stdout now, not at import
        elif name == "otlp":
            exporter = otlp_exporter("TRACES", "trace")()
        else:
            raise ConfigError(f"OTEL_TRACES_EXPORTER: unknown exporter {name!r}; use console, otlp or none")
        provider.add_span_processor(export.BatchSpanProcessor(exporter))
    log.info("tracing on", extra={"pipeline": pipeline, "exporters": ",".join(names)})
    return provider


def _application_provider() -> Any:
    """A tracer provider the application configured itself (an SDK one, not the no-op proxy)."""
    if "opentelemetry.sdk.trace" not in sys.modules:  # nobody built an SDK provider: don't import OTel
        return None
    try:
        trace = importlib.import_module("opentelemetry.trace")
        sdk = importlib.import_module("opentelemetry.sdk.trace")
    except ImportError:
        return None
    provider = trace.get_tracer_provider()
    return provider if isinstance(provider, sdk.TracerProvider) else None
