"""Spans per batch per stage, and trace context through HTTP and Kafka headers."""
from __future__ import annotations

import os
import subprocess
import sys

import polars as pl
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.trace import SpanKind

import streamfn as sf
from streamfn import observe
from streamfn.batch import Batch, Position
from streamfn.connectors import memory
from streamfn.contracts import Sink, Source, SourcePartition
from streamfn.errors import EndOfInput
from streamfn.observe.tracing import extract_context, inject_headers, set_batch_contexts, tracing_active

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
TRACE_ID = 0x0AF7651916CD43DD8448EB211C80319C
PARENT_SPAN_ID = 0xB7AD6B7169203331


def _pipeline(run_dir: str) -> sf.Pipeline:
    p = sf.Pipeline("traced", run_dir=run_dir)
    data = {"a": [pl.DataFrame({"x": range(10)}), pl.DataFrame({"x": range(10, 15)})],
            "b": [pl.DataFrame({"x": range(4)})]}
    nums = p.source(memory.source(data, name="nums"))

    @p.stage(nums)
    def keep_even(df: pl.DataFrame) -> pl.DataFrame:
        return df.filter(pl.col("x") % 2 == 0)

    keep_even.sink(memory.sink(name="out"))
    return p


def test_a_span_per_batch_per_stage_with_its_attributes(run_dir, span_exporter):
    provider, exporter = span_exporter
    p = _pipeline(run_dir)
    with observe.start(p, tracer_provider=provider):
        p.run(until_idle=True)
    spans = exporter.get_finished_spans()
    batches = [s for s in spans if s.name == "batch nums"]
    stages = [s for s in spans if s.name == "stage keep_even"]  # none for the end-of-input flush
    sinks = [s for s in spans if s.name == "sink out"]
    assert len(batches) == 3 and len(stages) == 3 and len(sinks) == 3
    by_id = {s.context.span_id: s for s in batches}
    for stage in stages:
        batch = by_id[stage.parent.span_id]  # every stage span is a child of its batch's span
        assert stage.context.trace_id == batch.context.trace_id
        attrs = stage.attributes
        assert attrs["streamfn.pipeline"] == "traced" and attrs["streamfn.stage"] == "keep_even"
        assert attrs["streamfn.engine"] == "cpu"
        assert attrs["streamfn.lane"] == f"nums[{attrs['streamfn.partition']}]"
        assert attrs["streamfn.offset.first"] == batch.attributes["streamfn.offset.first"]
        assert attrs["streamfn.rows.out"] == (attrs["streamfn.rows.in"] + 1) // 2
    first_batch_a = next(s for s in batches if s.attributes["streamfn.partition"] == "a"
                         and s.attributes["streamfn.offset.first"] == 10)
    assert first_batch_a.attributes["streamfn.offset.last"] == 14
    assert first_batch_a.attributes["streamfn.rows"] == 5
    assert first_batch_a.kind == SpanKind.CONSUMER
    assert sorted(s.attributes["streamfn.rows.in"] for s in sinks) == [2, 3, 5]


class _RequestPartition(SourcePartition):
    """Hands over one batch of 'requests', each with its HTTP headers, then ends."""

    def __init__(self, requests: list[dict[str, str]]) -> None:
        self.requests, self.done = requests, False

    def next_batch(self, max_rows: int) -> pl.DataFrame:
        if self.done:
            raise EndOfInput()
        self.done = True
        set_batch_contexts(extract_context(headers) for headers in self.requests)
        return pl.DataFrame({"n": list(range(len(self.requests)))})

    def position(self) -> Position:
        return len(self.requests) if self.done else 0


class _RequestSource(Source):
    def __init__(self, requests: list[dict[str, str]]) -> None:
        self.requests = requests

    def default_name(self) -> str:
        return "requests"

    def partitions(self) -> list[str]:
        return ["0"]

    def open(self, partition: str, resume: Position) -> SourcePartition:
        return _RequestPartition(self.requests)


class _HeaderSink(Sink):
    """Records the Kafka headers a producer would send for each batch."""

    def __init__(self) -> None:
        self.headers: list[list[tuple[str, bytes]]] = []

    def default_name(self) -> str:
        return "kafka_out"

    def write(self, batch: Batch) -> None:
        self.headers.append(inject_headers([("symbol", b"SYM001")]))

    def flush(self, checkpoint_id: str) -> None:
        pass


def test_trace_context_goes_from_the_http_traceparent_through_the_stages_to_kafka_headers(run_dir, span_exporter):
    provider, exporter = span_exporter
    other = "00-11111111111111111111111111111111-2222222222222222-01"
    sink = _HeaderSink()
    p = sf.Pipeline("follow", run_dir=run_dir)
    src = p.source(_RequestSource([{"Traceparent": TRACEPARENT}, {"traceparent": other}, {}]))
    p.stage(src, name="score")(lambda df: df.with_columns(score=pl.col("n") * 10)).sink(sink)
    with observe.start(p, tracer_provider=provider):
        p.run(until_idle=True)
    spans = exporter.get_finished_spans()
    batch = next(s for s in spans if s.name == "batch requests")
    assert batch.parent is not None and batch.parent.span_id == PARENT_SPAN_ID  # child of the request
    assert batch.context.trace_id == TRACE_ID
    assert [link.context.trace_id for link in batch.links] == [TRACE_ID, 0x11111111111111111111111111111111]
    score = next(s for s in spans if s.name == "stage score" and s.attributes["streamfn.rows.in"] == 3)
    assert score.context.trace_id == TRACE_ID
    (headers,) = sink.headers
    assert headers[0] == ("symbol", b"SYM001")
    sent = dict(headers)["traceparent"].decode()
    sink_span = next(s for s in spans if s.name == "sink kafka_out")
    assert sent == f"00-{TRACE_ID:032x}-{sink_span.context.span_id:016x}-01"
    downstream = extract_context(headers)  # the next job, reading the Kafka message
    assert downstream is not None


def test_kafka_and_http_carriers_round_trip():
    from opentelemetry.trace import get_current_span

    ctx = extract_context([("traceparent", TRACEPARENT.encode()), ("other", None)])
    assert get_current_span(ctx).get_span_context().trace_id == TRACE_ID
    kafka = inject_headers([], context=ctx)
    assert kafka == [("traceparent", TRACEPARENT.encode())]
    http = inject_headers({"content-type": "application/json"}, context=ctx)
    assert http == {"content-type": "application/json", "traceparent": TRACEPARENT}
    assert get_current_span(extract_context(http)).get_span_context().span_id == PARENT_SPAN_ID


def test_helpers_are_harmless_without_tracing():
    assert not tracing_active()
    headers = [("k", b"v")]
    assert inject_headers(headers) == [("k", b"v")]
    assert inject_headers() == []
    assert extract_context(None) is None
    assert extract_context({"traceparent": "garbage"}) is None
    assert extract_context([]) is None


def test_otlp_exporter_from_the_standard_environment_variables(run_dir, monkeypatch, otlp_collector):
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", otlp_collector.url)
    monkeypatch.setenv("OTEL_SERVICE_NAME", "ticks-job")
    _pipeline(run_dir).run(until_idle=True)  # no observe.start: the variables alone turn tracing on
    names, services = set(), set()
    for path, body in otlp_collector.received:
        assert path == "/v1/traces"
        request = ExportTraceServiceRequest.FromString(body)
        for rs in request.resource_spans:
            services |= {a.value.string_value for a in rs.resource.attributes if a.key == "service.name"}
            names |= {span.name for ss in rs.scope_spans for span in ss.spans}
    assert names == {"batch nums", "stage keep_even", "sink out"}
    assert services == {"ticks-job"}


def test_console_exporter_prints_spans(run_dir, monkeypatch, capfd):
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    _pipeline(run_dir).run(until_idle=True)
    out = capfd.readouterr().out
    assert '"name": "stage keep_even"' in out and '"streamfn.pipeline": "traced"' in out


def test_a_run_without_telemetry_does_not_import_opentelemetry(run_dir):
    code = (
        "import sys, polars as pl, streamfn as sf\n"
        "from streamfn.connectors import memory\n"
        f"p = sf.Pipeline('plain', run_dir={run_dir!r})\n"
        "p.source(memory.source(pl.DataFrame({'x': [1, 2]}))).sink(memory.sink())\n"
        "p.run(until_idle=True)\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_a_stage_that_breaks_the_run_leaves_error_spans(run_dir, span_exporter):
    from opentelemetry.trace import StatusCode

    provider, exporter = span_exporter
    p = sf.Pipeline("breaks", run_dir=run_dir)
    src = p.source(memory.source(pl.DataFrame({"x": [1, 2, 3]}), name="nums"))
    p.stage(src, name="wrong")(lambda df: "not a frame").sink(memory.sink())
    with observe.start(p, tracer_provider=provider):
        try:
            p.run(until_idle=True, handle_signals=False)
        except sf.StreamfnError:
            pass
    spans = {s.name: s for s in exporter.get_finished_spans()}
    for name in ("batch nums", "stage wrong"):
        assert spans[name].status.status_code == StatusCode.ERROR
        assert "returned str" in spans[name].status.description
        assert spans[name].events[0].name == "exception"
    assert spans["stage wrong"].parent.span_id == spans["batch nums"].context.span_id


class _KafkaSink(Sink):
    """Produces each row to a real broker with the trace context in the message headers."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        from confluent_kafka import Producer

        self.topic = topic
        self.producer = Producer({"bootstrap.servers": bootstrap})

    def default_name(self) -> str:
        return "kafka_out"

    def write(self, batch: Batch) -> None:
        headers = inject_headers([("source", batch.source.encode())])  # once per batch, on every message
        for n in batch.frame["n"].to_list():
            self.producer.produce(self.topic, value=str(n).encode(), headers=headers)

    def flush(self, checkpoint_id: str) -> None:
        assert self.producer.flush(10) == 0

    def close(self) -> None:
        self.producer = None  # the last reference: the client goes now, not when the broker is gone


@pytest.mark.integration
def test_trace_context_crosses_a_real_kafka_broker(run_dir, span_exporter, kafka_tansu):
    from confluent_kafka import Consumer
    from opentelemetry.trace import get_current_span

    provider, exporter = span_exporter
    topic = kafka_tansu.topic_name("traced")
    p = sf.Pipeline("to_kafka", run_dir=run_dir)
    src = p.source(_RequestSource([{"traceparent": TRACEPARENT}]))
    p.stage(src, name="score")(lambda df: df).sink(_KafkaSink(kafka_tansu.bootstrap, topic))
    with observe.start(p, tracer_provider=provider):
        p.run(until_idle=True, handle_signals=False)
    consumer = Consumer({"bootstrap.servers": kafka_tansu.bootstrap, "group.id": topic,
                         "auto.offset.reset": "earliest", **{k.removeprefix("kafka."): v
                                                             for k, v in kafka_tansu.settings.items()}})
    consumer.subscribe([topic])
    try:
        messages = []
        for _ in range(60):
            messages += [m for m in consumer.consume(10, timeout=0.5) if m.error() is None]
            if messages:
                break
    finally:
        consumer.close()
    assert messages, "no message came back from the broker"
    context = get_current_span(extract_context(messages[0].headers())).get_span_context()
    sink_span = next(s for s in exporter.get_finished_spans() if s.name == "sink kafka_out")
    assert (context.trace_id, context.span_id) == (TRACE_ID, sink_span.context.span_id)
