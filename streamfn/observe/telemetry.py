"""The observer that records OpenTelemetry spans and metric points for every batch."""
from __future__ import annotations

import sys
import threading
import time
from typing import TYPE_CHECKING, Any

from streamfn._optional import import_optional
from streamfn.observe import tracing
from streamfn.observe.metrics import Instruments
from streamfn.observe.observer import Observer

if TYPE_CHECKING:
    from streamfn.batch import Batch
    from streamfn.lane import Lane
    from streamfn.pipeline import Node
    from streamfn.runtime import Runtime


class _BatchScope:
    """The span of one batch, made current while the batch goes through the plan."""

    __slots__ = ("span", "token", "stage_span")

    def __init__(self, span: Any, token: Any) -> None:
        self.span, self.token, self.stage_span = span, token, None


class TelemetryObserver(Observer):
    """Records a span per batch and per stage, and the metrics, to the given providers."""

    telemetry = True

    def __init__(self, runtime: "Runtime", *, tracer_provider: Any, meter_provider: Any = None,
                 instruments: Instruments | None = None) -> None:
        """Record to these providers; `instruments` already registered (an Observation's, which
        reads `observables` of whichever run is current) take the place of `meter_provider`."""
        super().__init__(runtime)
        self._local = threading.local()
        self._node_attrs: dict[str, dict[str, str]] = {}
        self.tracer = None
        if tracer_provider is not None:
            self._trace = import_optional("opentelemetry.trace", extra="otel")
            self._context = import_optional("opentelemetry.context", extra="otel")
            self.tracer = tracer_provider.get_tracer("streamfn")
        self.observables: dict[str, Any] = {
            "streamfn.records.in": self._observe_records_in,
            "streamfn.records.out": self._observe_records_out,
            "streamfn.records.errors": self._observe_errors,
            "streamfn.dead_letters": self._observe_dead_letters,
            "streamfn.consumer.lag": self._observe_lag,
            "streamfn.watermark.delay": self._observe_watermark_delay,
            "streamfn.state.keys": self._observe_state_keys,
            "streamfn.lanes.open": self._observe_lanes,
        }
        self.instruments = instruments
        if instruments is None and meter_provider is not None:
            self.instruments = Instruments(meter_provider)
            self.instruments.observables(self.observables)
        self._base = {"pipeline": self.pipeline}

    def run_started(self) -> None:
        super().run_started()
        if self.tracer is not None:
            tracing._run_traced(+1)

    def run_finished(self, error: BaseException | None) -> None:
        super().run_finished(error)
        if self.tracer is not None:
            tracing._run_traced(-1)

    def _attrs(self, lane: "Lane | None", node: "Node") -> dict[str, str]:
        attrs = self._node_attrs.get(node.name)
        if attrs is None:
            runner = lane.runners.get(node.name) if lane is not None else None
            engine = getattr(runner, "engine", None) or node.options.get("engine") or "cpu"
            attrs = {"pipeline": self.pipeline, "stage": node.name, "kind": node.kind}
            if node.kind == "stage":
                attrs["engine"] = str(engine)
            self._node_attrs[node.name] = attrs
        return attrs

    def lane_opened(self, lane: "Lane") -> None:
        super().lane_opened(lane)
        for node in (lane.source, *lane.plan):  # the engine a stage's runner chose, once
            self._attrs(lane, node)

    # -- per batch ----------------------------------------------------------------------------
    def batch_begin(self, lane: "Lane", batch: "Batch", rejects: int) -> Any:
        if batch.watermark is not None:
            self.watermark(lane, batch.watermark)
        if self.tracer is None:
            return None
        parents = tracing.take_batch_contexts()
        links = [self._trace.Link(self._trace.get_current_span(c).get_span_context()) for c in parents or ()]
        span = self.tracer.start_span(  # a root unless a source handed over a context: never a leftover
            f"batch {lane.source.name}", context=parents[0] if parents else self._context.Context(), links=links,
            kind=self._trace.SpanKind.CONSUMER, attributes=self._batch_attrs(lane, batch, rejects))
        token = self._context.attach(self._trace.set_span_in_context(span))
        scope = _BatchScope(span, token)
        self._local.scope = scope
        return scope

    def _batch_attrs(self, lane: "Lane", batch: "Batch", rejects: int) -> dict[str, Any]:
        attrs: dict[str, Any] = {
            "streamfn.pipeline": self.pipeline, "streamfn.source": lane.source.name,
            "streamfn.lane": lane.id, "streamfn.partition": lane.partition,
            "streamfn.rows": batch.num_rows, "streamfn.rejects": rejects,
        }
        for key, value in (("first", batch.first_offset), ("last", batch.last_offset)):
            if value is not None:
                attrs[f"streamfn.offset.{key}"] = value
        return attrs

    def batch_end(self, scope: Any) -> None:
        if scope is None:
            return
        self._local.scope = None
        failed = sys.exc_info()[1]  # called from the lane's `finally`: the plan's error, if it raised
        if failed is not None:
            error = self._trace.Status(self._trace.StatusCode.ERROR, f"{type(failed).__name__}: {failed}")
            for span in (scope.stage_span, scope.span):
                if span is not None:
                    span.record_exception(failed)
                    span.set_status(error)
        if scope.stage_span is not None:  # the plan raised inside this stage
            scope.stage_span.end()
        self._context.detach(scope.token)
        scope.span.end()

    def stage_begin(self, lane: "Lane", node: "Node", batch: "Batch") -> Any:
        scope = getattr(self._local, "scope", None)
        if self.tracer is None or scope is None:  # no batch: the end-of-input flush is not traced
            return None
        attrs: dict[str, Any] = {
            "streamfn.pipeline": self.pipeline, "streamfn.stage": node.name, "streamfn.kind": node.kind,
            "streamfn.source": batch.source, "streamfn.lane": lane.id, "streamfn.partition": batch.partition,
        }
        if node.kind == "stage":
            attrs["streamfn.engine"] = self._attrs(lane, node)["engine"]
        for key, value in (("first", batch.first_offset), ("last", batch.last_offset)):
            if value is not None:
                attrs[f"streamfn.offset.{key}"] = value
        span = self.tracer.start_span(f"{node.kind} {node.name}", attributes=attrs)
        token = self._context.attach(self._trace.set_span_in_context(span))
        scope.stage_span = span
        return (span, token)

    def stage_end(self, scope: Any, lane: "Lane", node: "Node", rows_in: int, rows_out: int,
                  seconds: float) -> None:
        if self.instruments is not None and (rows_in or rows_out):  # not the empty end-of-input call
            self.instruments.batch_duration.record(seconds, self._attrs(lane, node))
        if scope is None:
            return
        span, token = scope
        span.set_attribute("streamfn.rows.in", rows_in)
        span.set_attribute("streamfn.rows.out", rows_out)
        self._context.detach(token)
        span.end()
        batch_scope = getattr(self._local, "scope", None)
        if batch_scope is not None:
            batch_scope.stage_span = None

    # -- rare events ------------------------------------------------------------------------
    def checkpoint(self, lane: "Lane", checkpoint_id: str, seconds: float, size_bytes: int | None) -> None:
        super().checkpoint(lane, checkpoint_id, seconds, size_bytes)
        if self.instruments is not None:
            self.instruments.checkpoint_duration.record(seconds, self._base)
            if size_bytes is not None:
                self.instruments.checkpoint_size.record(size_bytes, self._base)

    # -- counters and gauges, read on collection ---------------------------------------------
    def _per_node(self, field: str) -> list[Any]:
        nodes = {n.name: n for n in self.rt.order}
        totals = self.totals()
        return self._observations({name: getattr(stats, field) for name, stats in totals.items()},
                                  lambda name: self._attrs(None, nodes[name]))

    def _observe_records_in(self, options: Any) -> list[Any]:
        return self._per_node("rows_in")

    def _observe_records_out(self, options: Any) -> list[Any]:
        return self._per_node("rows_out")

    def _observe_errors(self, options: Any) -> list[Any]:
        return self._per_node("errors")

    def _observe_dead_letters(self, options: Any) -> list[Any]:
        return self._observations({"": self.live()["dead_letters"]}, lambda k: self._base)

    def _observations(self, values: dict[Any, float], attrs: Any) -> list[Any]:
        metrics_api = import_optional("opentelemetry.metrics", extra="otel")
        return [metrics_api.Observation(v, attrs(k)) for k, v in values.items()]

    def _observe_lag(self, options: Any) -> list[Any]:
        lag = self.live()["lag"]
        return self._observations(lag, lambda k: {"pipeline": self.pipeline, "source": k[0], "partition": k[1]})

    def _observe_watermark_delay(self, options: Any) -> list[Any]:
        now_ms = time.time() * 1000
        delays = {lane: (now_ms - wm) / 1000 for lane, wm in self.live()["watermarks"].items()}
        return self._observations(delays, lambda k: {"pipeline": self.pipeline, "lane": k})

    def _observe_state_keys(self, options: Any) -> list[Any]:
        per_store: dict[tuple[str, str], float] = {}
        for (stage, store, _lane), keys in self.live()["state_keys"].items():
            per_store[(stage, store)] = per_store.get((stage, store), 0) + keys
        return self._observations(per_store, lambda k: {"pipeline": self.pipeline, "stage": k[0], "store": k[1]})

    def _observe_lanes(self, options: Any) -> list[Any]:
        return self._observations({"": len(self.live()["lanes"])}, lambda k: self._base)
