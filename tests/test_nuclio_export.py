"""`streamfn export NOTEBOOK.ipynb`: a nuclio-jupyter notebook's magics in the spec, Dockerfile and manifests.

Each test writes a real notebook, runs the CLI as a subprocess and reads back what it wrote: the
spec is checked field by field and against its JSON Schema, the manifests against the Kubernetes
and KEDA schemas, and no secret value may appear in any file written.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import jsonschema
import nbformat
import pytest
import yaml
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from streamfn.notebook import read_notebook
from streamfn.spec import code_hash, read_spec
from tests.test_export import check_k8s, check_keda
from tests.test_notebook import _free_port, _wait_ready

SECRETS = {"MY_TOKEN": "tok-4f8a9c2e71d0", "DB_PASSWORD": "dbpw-93kd81jq", "SERVICE_PASSWORD": "svcpw-l1t3r4l-9921"}

HANDLER = """\
import os

def init_context(context):
    context.user_data.lang = os.environ['TARGET_LANG']

def handler(context, event):
    context.logger.info_with('called', path=event.path)
    names = ('API_TOKEN', 'DB_URL', 'DATA_DIR', 'REGION', 'SERVICE_PASSWORD', 'SPEC_ONLY')
    return {'lang': context.user_data.lang, **{n: os.environ.get(n) for n in names}}
"""


def write_notebook(path: Path, *cells: object) -> Path:
    """A notebook of these cells (a str is a code cell)."""
    nb = new_notebook(cells=[new_code_cell(c) if isinstance(c, str) else c for c in cells])
    nbformat.write(nb, str(path))
    return path


def export(notebook: Path, out: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streamfn.cli", "export", str(notebook), "-o", str(out),
                           *args],  # logs are JSON lines when stderr is not a terminal
                          check=False, capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})},
                          cwd=notebook.parent)


def warnings(stderr: str) -> list[dict]:
    logged = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    return [entry for entry in logged if entry["level"] == "warning"]


def every_file(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """The full nuclio-style notebook below, exported with its secrets in the environment."""
    folder = tmp_path_factory.mktemp("nb")
    (folder / "app.env").write_text(f"# shared settings\nREGION=eu-west\nSERVICE_PASSWORD={SECRETS['SERVICE_PASSWORD']}\n")
    notebook = write_notebook(
        folder / "sentiment.ipynb",
        new_markdown_cell("# A function written for nuclio-jupyter"),
        "# nuclio: ignore\nimport nuclio",
        "%nuclio cmd pip install textblob 'requests>=2'\n%nuclio cmd -c pip install -r extra-requirements.txt",
        "%%nuclio cmd\napt-get update && apt-get install -y libsndfile1\npython -m textblob.download_corpora lite",
        "%nuclio env TARGET_LANG=fr\n%nuclio env -l LOCAL_ONLY=1\n%nuclio env -c SPEC_ONLY=yes\n%nuclio env_file app.env",
        "%%nuclio env\nAPI_TOKEN=${MY_TOKEN}\nDB_URL=postgres://app:${DB_PASSWORD}@db:5432/app\nDATA_DIR=${HOME}/data",
        "%nuclio config spec.build.baseImage = \"python:3.11-bookworm\"\n"
        "%nuclio config spec.minReplicas = 2\n%nuclio config spec.maxReplicas = 5\n"
        "%nuclio config spec.resources.requests.cpu = \"250m\"\n"
        "%nuclio config spec.resources.requests.memory = \"256Mi\"\n"
        "%nuclio config spec.resources.limits.cpu = \"2\"\n%nuclio config spec.resources.limits.memory = \"1Gi\"\n"
        "%nuclio config spec.triggers.web.kind = \"http\"\n%nuclio config spec.triggers.web.attributes.port = 8090\n"
        "%nuclio config spec.triggers.web.maxWorkers = 4\n%nuclio config metadata.labels.team = \"nlp\"\n"
        "%nuclio config spec.build.commands += \"echo built\"",
        HANDLER,
        new_code_cell("event = nuclio.Event(body=b'hi')\nhandler(context, event)", metadata={"tags": ["nuclio-ignore"]}),
        "%nuclio deploy -n sentiment-fn -p demo",
    )
    out = folder / "out"
    return out, export(notebook, out, env=SECRETS)


def test_the_spec_carries_every_magic(exported: tuple[Path, subprocess.CompletedProcess]) -> None:
    out, result = exported
    assert result.returncode == 0, result.stderr
    doc = read_spec(str(out / "function.yaml"))  # the JSON Schema and the secret rules
    jsonschema.validate(doc, json.loads((out / "function.schema.json").read_text()))
    spec = doc["spec"]
    assert doc["metadata"]["name"] == "sentiment-fn"  # %nuclio deploy -n
    assert doc["metadata"]["labels"] == {"team": "nlp"}
    assert spec["runtime"]["baseImage"] == "python:3.11-bookworm"
    assert spec["replicas"] == {"min": 2, "max": 5}
    assert spec["resources"] == {"cpu": "250m", "memory": "256Mi", "gpu": 0, "cpuLimit": "2", "memoryLimit": "1Gi"}
    assert spec["ports"]["http"] == 8090
    assert [t["port"] for t in spec["triggers"] if t["kind"] == "http"] == [8090]
    assert spec["build"] == {"packages": ["textblob", "requests>=2"],
                             "commands": ["pip install -r extra-requirements.txt",
                                          "apt-get update && apt-get install -y libsndfile1",
                                          "python -m textblob.download_corpora lite", "echo built"]}
    secret = {"name": "sentiment-fn-secrets"}
    assert spec["env"] == [
        {"name": "API_TOKEN", "secretRef": {**secret, "key": "API_TOKEN"}, "localSecret": "env:MY_TOKEN"},
        {"name": "DATA_DIR", "value": "${HOME}/data"},
        {"name": "DB_PASSWORD", "secretRef": {**secret, "key": "DB_PASSWORD"}},
        {"name": "DB_URL", "value": "postgres://app:${DB_PASSWORD}@db:5432/app"},
        {"name": "REGION", "value": "eu-west"},
        {"name": "SERVICE_PASSWORD", "secretRef": {**secret, "key": "SERVICE_PASSWORD"}},
        {"name": "SPEC_ONLY", "value": "yes"},
        {"name": "TARGET_LANG", "value": "fr"},
    ]  # LOCAL_ONLY (-l) is for local runs only
    assert spec["nuclioConfig"] == {"spec.triggers.web.maxWorkers": 4, "%deploy": ["-p demo"]}
    [warning] = [w for w in warnings(result.stderr) if w["logger"] == "streamfn.nbexport" and "keys" in w]
    assert warning["keys"] == ["spec.triggers.web.maxWorkers", "%deploy -p demo"]


def test_dockerfile_and_requirements_install_the_packages_and_run_the_commands(
        exported: tuple[Path, subprocess.CompletedProcess]) -> None:
    out, _ = exported
    requirements = (out / "requirements.txt").read_text().splitlines()
    assert requirements[1:3] == ["textblob", "requests>=2"]
    lines = (out / "Dockerfile").read_text().splitlines()
    assert "ARG BASE_IMAGE=python:3.11-bookworm" in lines
    runs = [line for line in lines if line.startswith("RUN ")]
    assert runs[0] == "RUN pip install --find-links /app/wheels -r /app/requirements.txt"
    assert runs[2:] == ["RUN pip install -r extra-requirements.txt",
                        "RUN apt-get update && apt-get install -y libsndfile1",
                        "RUN python -m textblob.download_corpora lite", "RUN echo built"]
    assert lines.index(runs[-1]) < lines.index("USER 10001")  # build commands run as root
    assert "EXPOSE 8090 9464" in lines


def test_the_manifests_carry_replicas_resources_env_and_port(exported: tuple[Path, subprocess.CompletedProcess]) -> None:
    out, _ = exported
    deployment = yaml.safe_load((out / "k8s" / "deployment.yaml").read_text())
    service = yaml.safe_load((out / "k8s" / "service.yaml").read_text())
    configmap = yaml.safe_load((out / "k8s" / "configmap.yaml").read_text())
    for manifest in (deployment, service, configmap):
        check_k8s(manifest)
    assert deployment["spec"]["replicas"] == 2
    assert deployment["metadata"]["labels"]["team"] == "nlp"
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["image"].startswith("sentiment-fn:")
    assert container["resources"] == {"requests": {"cpu": "250m", "memory": "256Mi"},
                                      "limits": {"cpu": "2", "memory": "1Gi"}}
    assert {"name": "http", "containerPort": 8090, "protocol": "TCP"} in container["ports"]
    assert container["args"][-2:] == ["--port", "8090"]
    env = {e["name"]: e for e in container["env"]}
    assert env["TARGET_LANG"] == {"name": "TARGET_LANG", "value": "fr"}
    for name in ("API_TOKEN", "DB_PASSWORD", "SERVICE_PASSWORD"):
        assert env[name]["valueFrom"] == {"secretKeyRef": {"name": "sentiment-fn-secrets", "key": name}}
    assert "LOCAL_ONLY" not in env
    assert service["spec"]["ports"][0]["port"] == 8090
    assert "k8s/scaledobject.yaml" not in every_file(out)


def test_no_secret_value_is_written_anywhere(exported: tuple[Path, subprocess.CompletedProcess]) -> None:
    out, result = exported
    files = every_file(out)
    assert {"function.yaml", "Dockerfile", "requirements.txt", "sentiment.ipynb", "k8s/deployment.yaml"} <= set(files)
    for value in SECRETS.values():
        leaks = [name for name, data in files.items() if value.encode() in data]
        assert not leaks, f"{value} written into {leaks}"
        assert value not in result.stdout + result.stderr
    # the env file held a secret in clear: the exported notebook reads none, the spec has the rest
    copy = read_notebook(str(out / "sentiment.ipynb"))
    assert copy.magics.env_files == [] and "load_env_file" not in copy.source
    assert read_spec(str(out / "function.yaml"))["spec"]["codeHash"] == code_hash(str(out / "sentiment.ipynb"))


@pytest.mark.integration
def test_the_exported_spec_serves_the_same_handler(exported: tuple[Path, subprocess.CompletedProcess]) -> None:
    out, _ = exported
    port = _free_port()
    inherited = {k: v for k, v in os.environ.items() if k not in ("TARGET_LANG", "REGION", "SPEC_ONLY")}
    env = {**inherited, "MY_TOKEN": SECRETS["MY_TOKEN"], "DB_PASSWORD": SECRETS["DB_PASSWORD"],
           "SERVICE_PASSWORD": SECRETS["SERVICE_PASSWORD"], "HOME": "/home/fn"}
    server = subprocess.Popen([sys.executable, "-m", "streamfn.cli", "run", str(out / "function.yaml"),
                               "--port", str(port), "--log-format", "json"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=out)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_ready(base, server)
        answer = httpx.post(base + "/hello", json={"text": "hi"})
    finally:
        server.send_signal(signal.SIGTERM)
        _, stderr = server.communicate(timeout=30)
    assert answer.status_code == 200, stderr
    assert answer.json() == {"lang": "fr", "API_TOKEN": SECRETS["MY_TOKEN"],
                             "DB_URL": f"postgres://app:{SECRETS['DB_PASSWORD']}@db:5432/app",
                             "DATA_DIR": "/home/fn/data", "REGION": "eu-west",
                             "SERVICE_PASSWORD": SECRETS["SERVICE_PASSWORD"], "SPEC_ONLY": "yes"}
    assert not any(value in stderr for value in SECRETS.values())


def test_a_secret_in_clear_in_a_magic_is_left_out_of_every_file(tmp_path: Path) -> None:
    literal = "sk-live-8d7f6e5a4b3c"
    notebook = write_notebook(tmp_path / "fn.ipynb", f"%nuclio env API_KEY={literal}\n%nuclio env MODE=prod",
                              f"%%nuclio env\nDB_URL=postgres://app:pw-{literal}@db/app", HANDLER.replace(
                                  "context.user_data.lang = os.environ['TARGET_LANG']", "pass"))
    result = export(notebook, tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert not [name for name, data in every_file(tmp_path / "out").items() if literal.encode() in data]
    spec = read_spec(str(tmp_path / "out" / "function.yaml"))["spec"]
    assert {e["name"]: e.get("secretRef") for e in spec["env"]} == {
        "API_KEY": {"name": "fn-secrets", "key": "API_KEY"}, "DB_URL": {"name": "fn-secrets", "key": "DB_URL"},
        "MODE": None}
    copy = read_notebook(str(tmp_path / "out" / "fn.ipynb"))
    assert copy.magics.env == {"API_KEY": "${API_KEY}", "MODE": "prod", "DB_URL": "${DB_URL}"}
    [warning] = [w for w in warnings(result.stderr) if "variables" in w]
    assert warning["variables"] == ["API_KEY", "DB_URL"]
    # the Secret is not there: running the spec says which variable to set
    run = subprocess.run([sys.executable, "-m", "streamfn.cli", "run", str(tmp_path / "out" / "function.yaml")],
                         check=False, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert run.returncode != 0 and "$API_KEY is not set; it comes from secret 'fn-secrets'" in run.stderr


def test_a_secret_also_used_outside_its_magic_refuses_to_export(tmp_path: Path) -> None:
    literal = "sk-live-1a2b3c4d5e6f"
    notebook = write_notebook(tmp_path / "fn.ipynb", f"%nuclio env API_KEY={literal}",
                              f"KEY = '{literal}'\n" + HANDLER)
    result = export(notebook, tmp_path / "out")
    assert result.returncode != 0
    assert "the value of API_KEY appears outside its env magic" in result.stderr
    assert not (tmp_path / "out" / "fn.ipynb").exists()


def test_unsupported_config_keys_are_kept_verbatim_with_one_warning(tmp_path: Path) -> None:
    notebook = write_notebook(
        tmp_path / "fn.ipynb", HANDLER, "%nuclio env TARGET_LANG=en",
        "%nuclio config spec.timeoutSeconds = 30\n%nuclio config spec.description = \"says hello\"\n"
        "%nuclio config spec.triggers.every.kind = \"cron\"\n"
        "%nuclio config spec.triggers.every.attributes.interval = \"1m\"\n"
        "%nuclio config spec.handler = \"fn:handler\"\n%nuclio mount /data v3io:///users/me",
        "%nuclio config spec.maxReplicas = 3\n%nuclio config spec.replicas = 2")
    result = export(notebook, tmp_path / "out", "--set", "spec.memory=512Mi")
    assert result.returncode == 0, result.stderr
    spec = read_spec(str(tmp_path / "out" / "function.yaml"))["spec"]
    assert spec["nuclioConfig"] == {"spec.timeoutSeconds": 30, "spec.description": "says hello",
                                    "spec.triggers.every.kind": "cron",
                                    "spec.triggers.every.attributes.interval": "1m",
                                    "%mount": ["/data v3io:///users/me"]}
    assert spec["replicas"] == {"min": 2, "max": 2}  # spec.replicas came last
    assert spec["resources"]["memory"] == "512Mi"
    [warning] = [w for w in warnings(result.stderr) if "keys" in w]
    assert warning["keys"] == ["spec.timeoutSeconds", "spec.description", "spec.triggers.every.kind",
                               "spec.triggers.every.attributes.interval", "%mount /data v3io:///users/me"]
    assert "spec.handler" not in result.stderr  # 'handler' is what streamfn serves too


def test_set_on_the_command_line_wins_over_the_notebook(tmp_path: Path) -> None:
    notebook = write_notebook(tmp_path / "fn.ipynb", HANDLER, "%nuclio env TARGET_LANG=en",
                              "%nuclio config spec.maxReplicas = 5\n%nuclio config spec.build.baseImage = \"x:1\"")
    result = export(notebook, tmp_path / "out", "--set", "spec.max_replicas=3", "--set", "env.TARGET_LANG=de")
    assert result.returncode == 0, result.stderr
    spec = read_spec(str(tmp_path / "out" / "function.yaml"))["spec"]
    assert (spec["replicas"]["max"], spec["runtime"]["baseImage"]) == (3, "x:1")
    assert spec["env"] == [{"name": "TARGET_LANG", "value": "de"}]


def test_a_bad_config_value_is_a_one_line_error_naming_the_key(tmp_path: Path) -> None:
    notebook = write_notebook(tmp_path / "fn.ipynb", HANDLER, "%nuclio config spec.minReplicas = \"many\"")
    result = export(notebook, tmp_path / "out")
    assert result.returncode != 0
    assert "%nuclio config spec.minReplicas = 'many': expected a whole number" in result.stderr
    assert "Traceback" not in result.stderr


def test_kafka_trigger_config_sets_the_scaled_object(tmp_path: Path) -> None:
    notebook = write_notebook(
        tmp_path / "trades.ipynb",
        "import streamfn as sf\nfrom streamfn.connectors import kafka, memory\np = sf.Pipeline('trades')\n"
        "t = p.source(kafka.topic('trades', create=True, partitions=6))\nt.sink(memory.sink())",
        "%nuclio config spec.triggers.k.kind = \"kafka-cluster\"\n"
        "%nuclio config spec.triggers.k.attributes.brokers = [\"kafka-0:9092\", \"kafka-1:9092\"]\n"
        "%nuclio config spec.triggers.k.attributes.consumerGroup = \"traders\"\n"
        "%nuclio config spec.resources.limits.nvidia.com/gpu = 1\n%nuclio config spec.maxReplicas = 4")
    result = export(notebook, tmp_path / "out")
    assert result.returncode == 0, result.stderr
    spec = read_spec(str(tmp_path / "out" / "function.yaml"))["spec"]
    assert spec["resources"]["gpu"] == 1 and "nuclioConfig" not in spec
    scaled = yaml.safe_load((tmp_path / "out" / "k8s" / "scaledobject.yaml").read_text())
    check_keda(scaled)
    assert scaled["spec"]["maxReplicaCount"] == 4
    assert scaled["spec"]["triggers"][0]["metadata"]["bootstrapServers"] == "kafka-0:9092,kafka-1:9092"
    assert scaled["spec"]["triggers"][0]["metadata"]["consumerGroup"] == "traders"
    deployment = yaml.safe_load((tmp_path / "out" / "k8s" / "deployment.yaml").read_text())
    check_k8s(deployment)
    assert deployment["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_pip_lines_with_options_stay_build_commands(tmp_path: Path) -> None:
    notebook = write_notebook(tmp_path / "fn.ipynb",
                              "%nuclio cmd pip install -U numpy\n%nuclio cmd pip install --index-url https://x/simple y\n"
                              "%nuclio cmd python -m pip install ./local-pkg\n%nuclio cmd pip3 install scipy==1.13")
    magics = read_notebook(str(notebook)).magics
    assert magics.packages == ["numpy", "scipy==1.13"]
    assert magics.commands == ["pip install --index-url https://x/simple y", "python -m pip install ./local-pkg"]
