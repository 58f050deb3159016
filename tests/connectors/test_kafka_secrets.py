"""Kafka credentials from the environment or a file: resolved for the client, never kept as text."""
from __future__ import annotations

import pytest

from streamfn.connectors.kafka.config import client_config
from streamfn.errors import ConfigError


def conf(**given):
    return client_config("producer", brokers="127.0.0.1:9", embedded=False, settings={}, given=given)


def test_env_and_file_references_are_resolved(tmp_path, monkeypatch):
    monkeypatch.setenv("KAFKA_PASSWORD", "s3cr3t")
    (tmp_path / "user").write_text("alice\n")
    c = conf(**{"security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512",
                "sasl.username": f"file:{tmp_path / 'user'}", "sasl.password": "env:KAFKA_PASSWORD"})
    assert (c["sasl.username"], c["sasl.password"]) == ("alice", "s3cr3t")
    assert c["security.protocol"] == "SASL_SSL"


def test_settings_from_the_command_line_are_resolved_too(monkeypatch):
    monkeypatch.setenv("KAFKA_PASSWORD", "from-env")
    c = client_config("consumer", brokers="127.0.0.1:9", embedded=False,
                      settings={"kafka.sasl.password": "env:KAFKA_PASSWORD"}, given={})
    assert c["sasl.password"] == "from-env"


def test_a_missing_secret_is_a_clear_error_that_does_not_echo_values(monkeypatch, tmp_path):
    monkeypatch.delenv("NOPE", raising=False)
    with pytest.raises(ConfigError, match="the Kafka setting sasl.password: the environment variable NOPE"):
        conf(**{"sasl.password": "env:NOPE"})
    with pytest.raises(ConfigError, match="cannot read the secret file"):
        conf(**{"ssl.key.password": f"file:{tmp_path / 'missing'}"})


def test_plain_values_and_other_keys_are_left_alone():
    c = conf(**{"sasl.password": "literal", "client.id": "env:not-a-secret-key"})
    assert c["sasl.password"] == "literal" and c["client.id"] == "env:not-a-secret-key"
