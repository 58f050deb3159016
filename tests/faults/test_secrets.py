"""A secret given in the configuration never shows: not in logs, /status, /metrics, the dashboard,
the exported spec and manifests, nor in the error a client gets.

The Kafka SASL settings are passed through to librdkafka as `--set kafka.sasl.*`; against the test
broker (PLAINTEXT) librdkafka ignores them, which is enough to see where the values travel.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import httpx
import pytest
from streamfn.connectors.kafka.config import client_config

from streamfn import observe
from streamfn.export import export_pipeline
from streamfn.loader import load_pipeline
from streamfn.log import JsonFormatter
from tests.servers.http import serving
from tests.stateful.test_kafka_crash import produce

pytestmark = pytest.mark.integration

KAFKA_SECRET = "kafka-pw-7f3a9c"
HTTP_SECRET = "http-token-51be0d"
S3_SECRET = "s3-secret-0a9e44"

PIPELINE = """
import polars as pl
import streamfn as sf
from streamfn.connectors import http, kafka, memory

p = sf.Pipeline("secretive")
ticks = p.source(kafka.topic({topic!r}, format="json", group={group!r}), name="ticks")
ticks.sink(memory.sink())
calls = p.source(http.endpoint("/calls", port=0), name="calls")
calls.sink(memory.sink(name="calls_sink"))
"""


def test_sasl_settings_reach_the_client_as_given():
    conf = client_config("consumer", brokers="b:9092", embedded=False, given={}, settings={
        "kafka.security.protocol": "SASL_SSL", "kafka.sasl.mechanism": "SCRAM-SHA-512",
        "kafka.sasl.username": "alice", "kafka.sasl.password": KAFKA_SECRET, "kafka.ssl.ca.location": "/ca.pem"})
    assert {k: conf[k] for k in ("security.protocol", "sasl.mechanism", "sasl.username", "sasl.password",
                                 "ssl.ca.location")} == {
        "security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512", "sasl.username": "alice",
        "sasl.password": KAFKA_SECRET, "ssl.ca.location": "/ca.pem"}


def test_secrets_never_show(tmp_path, kafka_tansu, caplog, capfd, monkeypatch):
    topic = kafka_tansu.topic_name("secret")
    produce(kafka_tansu.bootstrap, topic, [{"symbol": "A", "ts": i, "price": 1.0, "volume": 1} for i in range(50)])
    code = tmp_path / "job.py"
    code.write_text(PIPELINE.format(topic=topic, group=f"g-{topic}"))
    monkeypatch.setenv("CALLS_TOKEN", HTTP_SECRET)
    settings = {**kafka_tansu.run_settings(), "kafka.sasl.username": "alice", "kafka.sasl.password": KAFKA_SECRET,
                "http.token": "env:CALLS_TOKEN", "checkpoint.storage.secret": S3_SECRET}
    secrets = (KAFKA_SECRET, HTTP_SECRET, S3_SECRET)

    caplog.set_level(logging.DEBUG)
    pipeline = load_pipeline(str(code))
    with serving(pipeline, settings=settings) as run:
        obs = observe.start(run.runtime, metrics_port=0)
        try:
            with httpx.Client() as client:
                sink = next(n.connector for n in pipeline.nodes if n.kind == "sink" and n.upstreams[0].name == "ticks")
                deadline = time.monotonic() + 30
                while sink.frame().height < 50 and time.monotonic() < deadline:  # the records went through
                    time.sleep(0.1)
                assert sink.frame().height == 50
                pages = {path: client.get(obs.url + path).text for path in ("/status", "/metrics", "/")}
                refused = client.post(run.url("calls"), json={"x": 1}, headers={"authorization": "Bearer wrong"})
                wrong_key = client.post(run.url("calls"), json={"x": 1}, headers={"x-api-key": KAFKA_SECRET})
        finally:
            obs.close()
    assert refused.status_code == 401 and wrong_key.status_code == 401
    pages["401"] = refused.text + json.dumps(dict(refused.headers))

    out = tmp_path / "export"
    files = export_pipeline(load_pipeline(str(code)), str(code), str(out), settings=dict(settings))
    exported = {os.path.relpath(f, out): Path(f).read_text() for f in files}

    formatter = JsonFormatter()  # the --log-format json line, with every extra field
    logs = "\n".join([caplog.text, *(formatter.format(r) for r in caplog.records)])
    captured = capfd.readouterr()
    for secret in secrets:
        assert secret not in logs, f"{secret} is in the log"
        assert secret not in captured.out + captured.err, f"{secret} is on stdout/stderr"
        for where, text in {**pages, **exported}.items():
            assert secret not in text, f"{secret} shows in {where}"
    deployment = exported["k8s/deployment.yaml"]
    assert "secretKeyRef" in deployment and "kafka.sasl.password" in deployment  # by reference only
