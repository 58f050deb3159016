"""One record's trace, followed for real: an HTTP request's traceparent, through a stage, into the
headers of the Kafka messages the sink produces (Tansu on loopback), and on into the next job."""
from __future__ import annotations

import time
import uuid

import httpx
import polars as pl
import pytest

import streamfn as sf
from streamfn import observe
from streamfn.connectors import http, kafka, memory
from tests.servers.http import serving
from tests.servers.kafka import KafkaServer

TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736
TRACEPARENT = f"00-{TRACE_ID:032x}-00f067aa0ba902b7-01"


def read_headers(server: KafkaServer, topic: str, expect: int, timeout_s: float = 20.0) -> list[dict[str, bytes]]:
    from confluent_kafka import Consumer

    consumer = Consumer({"bootstrap.servers": server.bootstrap, "group.id": f"g-{uuid.uuid4().hex[:8]}",
                         "auto.offset.reset": "earliest", "session.timeout.ms": 1000,
                         "heartbeat.interval.ms": 200})
    consumer.subscribe([topic])
    found: list[dict[str, bytes]] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(found) < expect and time.monotonic() < deadline:
            for message in consumer.consume(100, timeout=0.5):
                if message.error() is None:
                    found.append(dict(message.headers() or []))
    finally:
        consumer.close()
    return found


@pytest.mark.integration
def test_an_http_traceparent_reaches_the_kafka_messages(kafka_tansu: KafkaServer, span_exporter, run_dir):
    provider, exporter = span_exporter
    topic = kafka_tansu.topic_name("traced")
    p = sf.Pipeline("traced", run_dir=run_dir, checkpoint_interval="100ms")
    requests = p.source(http.endpoint("/score", port=0), name="requests")
    scored = p.stage(requests, name="score")(lambda df: df.with_columns(score=pl.col("x") * 2))
    scored.sink(kafka.topic(topic, create=True, partitions=1), name="out")
    with observe.start(p, tracer_provider=provider):
        with serving(p, settings=kafka_tansu.run_settings()) as run:
            answer = httpx.post(run.url("requests"), json=[{"x": 1}, {"x": 2}],
                                headers={"traceparent": TRACEPARENT}, timeout=10)
            assert answer.status_code == 202
            headers = read_headers(kafka_tansu, topic, expect=2)
    assert len(headers) == 2
    sink_spans = [s for s in exporter.get_finished_spans() if s.name == "sink out"]
    assert sink_spans and all(s.context.trace_id == TRACE_ID for s in sink_spans)
    for h in headers:  # each message names the request's trace and the sink span that produced it
        version, trace, span, flags = h["traceparent"].decode().split("-")
        assert int(trace, 16) == TRACE_ID and int(span, 16) in {s.context.span_id for s in sink_spans}

    # The next job reads those messages: its batch span continues the same trace.
    exporter.clear()
    nxt = sf.Pipeline("next_job", run_dir=run_dir + "-next")
    nxt.source(kafka.topic(topic, group=f"next-{uuid.uuid4().hex[:6]}", start="earliest"), name="scored") \
        .sink(memory.sink())
    with observe.start(nxt, tracer_provider=provider):
        nxt.run(until_idle=True, settings=kafka_tansu.run_settings(), handle_signals=False)
    batches = [s for s in exporter.get_finished_spans() if s.name == "batch scored"]
    assert batches and all(s.context.trace_id == TRACE_ID for s in batches)
