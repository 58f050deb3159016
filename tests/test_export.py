"""`streamfn export`: the Dockerfile and manifests, checked against the Kubernetes and KEDA schemas.

No cluster is needed: Deployment/Service/ConfigMap go through kubernetes-validate (the published
Kubernetes JSON schemas, strict: unknown fields fail) and the ScaledObject through the KEDA
CRD's models (cloudcoil.models.keda), with a round trip that catches unknown fields.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from cloudcoil.models.keda.v1alpha1 import ScaledObject

from streamfn.errors import ConfigError
from streamfn.export import export_pipeline
from streamfn.loader import load_pipeline

DATA = Path(__file__).parent / "data" / "export"
K8S_VERSION = "1.30.0"


def check_k8s(doc: dict) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def check_keda(doc: dict) -> None:
    model = ScaledObject.model_validate(doc)
    again = model.model_dump(by_alias=True, exclude_unset=True, mode="json")
    assert again == doc, "the ScaledObject has fields the KEDA CRD does not know"


def export(tmp_path: Path, name: str, **settings: str) -> dict[str, object]:
    path = str(DATA / name)
    out = tmp_path / "out"
    files = export_pipeline(load_pipeline(path), path, str(out), settings=dict(settings))
    assert all(os.path.isfile(f) for f in files)
    docs: dict[str, object] = {os.path.relpath(f, out): Path(f).read_text() for f in files}
    return docs


def manifest(docs: dict, kind: str) -> dict:
    return yaml.safe_load(docs[f"k8s/{kind}.yaml"])


def test_kafka_gpu_pipeline_exports_valid_manifests(tmp_path: Path) -> None:
    docs = export(tmp_path, "kafka_pipe.py", **{"kafka.brokers": "kafka-0:9092", "spec.version": "2.0.0"})
    assert {"function.yaml", "function.schema.json", "Dockerfile", "requirements.txt", "kafka_pipe.py",
            "k8s/deployment.yaml", "k8s/configmap.yaml", "k8s/scaledobject.yaml"} <= set(docs)
    assert "k8s/service.yaml" not in docs  # no HTTP trigger
    deployment, configmap = manifest(docs, "deployment"), manifest(docs, "configmap")
    check_k8s(deployment)
    check_k8s(configmap)
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert pod["terminationGracePeriodSeconds"] >= 2 * 20 + 30  # two checkpoint intervals of 20s
    assert yaml.safe_load(configmap["data"]["function.yaml"]) == yaml.safe_load(docs["function.yaml"])
    scaled = manifest(docs, "scaledobject")
    check_keda(scaled)
    assert scaled["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert (scaled["spec"]["minReplicaCount"], scaled["spec"]["maxReplicaCount"]) == (1, 4)
    meta = scaled["spec"]["triggers"][0]["metadata"]
    assert meta == {"bootstrapServers": "kafka-0:9092", "consumerGroup": "vwap", "topic": "ticks",
                    "lagThreshold": "1000", "offsetResetPolicy": "earliest", "allowIdleConsumers": "false"}
    dockerfile = docs["Dockerfile"]
    assert "FROM ${BASE_IMAGE}" in dockerfile and "ARG BASE_IMAGE=rapidsai/base:" in dockerfile
    assert "-cuda12-py3." in dockerfile


def test_max_replicas_are_capped_at_the_partition_count(tmp_path: Path) -> None:
    docs = export(tmp_path, "kafka_pipe.py", **{"spec.max_replicas": "12", "spec.min_replicas": "2"})
    scaled = manifest(docs, "scaledobject")
    check_keda(scaled)
    assert (scaled["spec"]["minReplicaCount"], scaled["spec"]["maxReplicaCount"]) == (2, 4)
    assert manifest(docs, "deployment")["spec"]["replicas"] == 2


def test_min_above_the_partition_count_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"min_replicas \(5\) is more than the most replicas \(4"):
        export(tmp_path, "kafka_pipe.py", **{"spec.min_replicas": "5"})


def test_http_trigger_gets_a_service_and_a_slim_cpu_image(tmp_path: Path) -> None:
    docs = export(tmp_path, "http_pipe.py", **{"spec.cpu": "500m", "spec.memory": "256Mi"})
    service, deployment = manifest(docs, "service"), manifest(docs, "deployment")
    check_k8s(service)
    check_k8s(deployment)
    assert service["spec"]["ports"][0]["port"] == 8088
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "http", "containerPort": 8088, "protocol": "TCP"} in container["ports"]
    assert container["resources"] == {"requests": {"cpu": "500m", "memory": "256Mi"},
                                      "limits": {"memory": "256Mi"}}
    assert "k8s/scaledobject.yaml" not in docs
    assert "ARG BASE_IMAGE=python:3.11-slim" in docs["Dockerfile"]


def test_export_is_reproducible(tmp_path: Path) -> None:
    first = export(tmp_path / "a", "kafka_pipe.py", **{"kafka.brokers": "k:9092"})
    second = export(tmp_path / "b", "kafka_pipe.py", **{"kafka.brokers": "k:9092"})
    assert first == second


def test_secrets_are_written_only_as_references(tmp_path: Path) -> None:
    docs = export(tmp_path, "http_pipe.py", **{"db.password": "hunter2", "env.API_TOKEN": "s3cr3t",
                                               "env.MODE": "prod", "kafka.sasl.username": "me",
                                               "s3.key": "secret:aws-creds/access-key"})
    assert not any("hunter2" in text or "s3cr3t" in text for text in docs.values())
    env = manifest(docs, "deployment")["spec"]["template"]["spec"]["containers"][0]["env"]
    by_name = {e["name"]: e for e in env}
    assert by_name["MODE"] == {"name": "MODE", "value": "prod"}
    assert by_name["API_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "events-secrets", "key": "API_TOKEN"}}
    assert by_name["STREAMFN_SECRET_DB_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == "db.password"
    assert by_name["STREAMFN_SECRET_S3_KEY"]["valueFrom"] == {
        "secretKeyRef": {"name": "aws-creds", "key": "access-key"}}
    spec = yaml.safe_load(docs["function.yaml"])["spec"]
    assert spec["settings"]["db.password"] == {"fromEnv": "STREAMFN_SECRET_DB_PASSWORD"}
    assert spec["settings"]["kafka.sasl.username"] == "me"


def test_the_validators_reject_broken_manifests(tmp_path: Path) -> None:
    """The schema checks above bite: unknown fields and wrong types fail."""
    docs = export(tmp_path, "kafka_pipe.py")
    deployment, scaled = manifest(docs, "deployment"), manifest(docs, "scaledobject")
    bad = copy.deepcopy(deployment)
    bad["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGett"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        check_k8s(bad)
    bad = copy.deepcopy(deployment)
    bad["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        check_k8s(bad)
    bad = copy.deepcopy(scaled)
    bad["spec"]["maxReplicas"] = 3
    with pytest.raises(AssertionError, match="fields the KEDA CRD does not know"):
        check_keda(bad)
    bad = copy.deepcopy(scaled)
    del bad["spec"]["scaleTargetRef"]
    with pytest.raises(ValueError, match="scaleTargetRef"):
        check_keda(bad)


def test_export_into_a_file_is_a_clear_error(tmp_path: Path) -> None:
    target = tmp_path / "taken"
    target.write_text("x")
    path = str(DATA / "http_pipe.py")
    with pytest.raises(ConfigError, match="is a file"):
        export_pipeline(load_pipeline(path), path, str(target), settings={})


def test_a_real_kafka_topic_becomes_the_keda_trigger(tmp_path: Path) -> None:
    """kafka.topic() needs no broker to be exported: topic, group, brokers and partitions come from it."""
    code = tmp_path / "kpipe.py"
    code.write_text(
        "import streamfn as sf\nfrom streamfn.connectors import kafka, memory\n"
        "p = sf.Pipeline('kjob')\n"
        "t = p.source(kafka.topic('trades', group='g1', brokers='kafka-0:9092', create=True, partitions=6))\n"
        "t.sink(memory.sink())\n")
    out = tmp_path / "out"
    export_pipeline(load_pipeline(str(code)), str(code), str(out), settings={"spec.max_replicas": "10"})
    scaled = yaml.safe_load((out / "k8s" / "scaledobject.yaml").read_text())
    check_keda(scaled)
    assert scaled["spec"]["maxReplicaCount"] == 6
    assert scaled["spec"]["triggers"][0]["metadata"]["topic"] == "trades"
    assert scaled["spec"]["triggers"][0]["metadata"]["consumerGroup"] == "g1"
    assert scaled["spec"]["triggers"][0]["metadata"]["bootstrapServers"] == "kafka-0:9092"
