"""The function spec: built from a pipeline, checked against its JSON Schema, run with `streamfn run`."""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import polars as pl
import pytest
import yaml

from streamfn.errors import ConfigError
from streamfn.export import export_pipeline
from streamfn.loader import load_pipeline
from streamfn.spec import build_spec, load_spec, read_spec, schema

DATA = Path(__file__).parent / "data" / "export"


@pytest.fixture
def spec_file(tmp_path: Path) -> Path:
    """An exported spec of kafka_pipe.py (with the pipeline's file next to it)."""
    path = str(DATA / "kafka_pipe.py")
    export_pipeline(load_pipeline(path), path + ":p", str(tmp_path), settings={"kafka.group": "g1"})
    return tmp_path / "function.yaml"


def rewrite(spec_file: Path, change) -> Path:
    doc = yaml.safe_load(spec_file.read_text())
    change(doc)
    spec_file.write_text(yaml.safe_dump(doc))
    return spec_file


def test_the_schema_is_a_valid_json_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(schema())


def test_spec_describes_the_pipeline(spec_file: Path) -> None:
    doc = read_spec(str(spec_file))
    spec = doc["spec"]
    assert doc["metadata"]["name"] == "vwap-gpu" and doc["metadata"]["pipeline"] == "vwap_gpu"
    assert spec["entryPoint"] == {"file": "kafka_pipe.py", "attr": "p"}
    assert spec["codeHash"].startswith("sha256:") and len(spec["codeHash"]) == 71
    assert spec["engines"] == {"clean": "gpu"}
    assert spec["resources"]["gpu"] == 1
    assert spec["replicas"] == {"min": 1, "max": 4, "lagThreshold": 1000}
    assert spec["checkpoint"] == {"url": "s3://bucket/ckpt", "intervalSeconds": 20.0}
    assert spec["triggers"][0]["kind"] == "kafka" and spec["triggers"][0]["topic"] == "ticks"
    pins = dict(p.split("==") for p in spec["packages"])
    import polars
    assert pins["polars"] == polars.__version__
    assert "cudf-cu12" not in pins  # a GPU image takes cudf from its RAPIDS base


def test_load_spec_gives_the_entry_point_and_settings(spec_file: Path) -> None:
    target, settings = load_spec(str(spec_file))
    assert target == str(spec_file.parent / "kafka_pipe.py") + ":p"
    assert settings == {"kafka.group": "g1", "checkpoint": "s3://bucket/ckpt"}


@pytest.mark.parametrize("change, message", [
    (lambda d: d["spec"]["replicas"].update(max=0), r"spec\.replicas\.max: 0 is less than the minimum of 1"),
    (lambda d: d["spec"]["replicas"].update(min=3, max=2), r"spec\.replicas: min \(3\) is more than max \(2\)"),
    (lambda d: d["spec"].pop("codeHash"), r"\(top level\)|spec: 'codeHash' is a required property"),
    (lambda d: d["spec"].update(replica={}), r"spec: Additional properties are not allowed \('replica'"),
    (lambda d: d["spec"]["resources"].update(memory="lots"), r"spec\.resources\.memory: 'lots' does not match"),
    (lambda d: d["spec"]["env"].append({"name": "DB_PASSWORD", "value": "x"}),
     r"spec\.env\[0\]: DB_PASSWORD looks like a secret"),
    (lambda d: d["spec"]["env"].append({"name": "A"}), r"spec\.env\[0\]: .*valid under|spec\.env\[0\]"),
    (lambda d: d.update(apiVersion="streamfn/v2"), r"apiVersion: 'streamfn/v1' was expected"),
    (lambda d: d["metadata"].update(name="Not_A_Label"), r"metadata\.name: 'Not_A_Label' does not match"),
])
def test_invalid_specs_fail_with_one_line_naming_the_field(spec_file: Path, change, message) -> None:
    rewrite(spec_file, change)
    with pytest.raises(ConfigError, match=message) as info:
        load_spec(str(spec_file))
    assert "\n" not in str(info.value) and str(spec_file) in str(info.value)


def test_changed_code_is_refused(spec_file: Path) -> None:
    code = spec_file.parent / "kafka_pipe.py"
    code.write_text(code.read_text() + "\n# edited\n")
    with pytest.raises(ConfigError, match="changed since the spec was written"):
        load_spec(str(spec_file))


def test_missing_code_is_a_clear_error(spec_file: Path) -> None:
    (spec_file.parent / "kafka_pipe.py").unlink()
    with pytest.raises(ConfigError, match="entryPoint.file 'kafka_pipe.py' is neither next to the spec"):
        load_spec(str(spec_file))


def test_bad_yaml_and_other_documents(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("spec: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: not valid YAML"):
        load_spec(str(bad))
    other = tmp_path / "deploy.yaml"
    other.write_text("kind: Deployment\n")
    with pytest.raises(ConfigError, match="not a streamfn function spec"):
        load_spec(str(other))
    with pytest.raises(ConfigError, match="no such spec file"):
        load_spec(str(tmp_path / "none.yaml"))


def test_secret_settings_come_from_the_environment(tmp_path: Path, monkeypatch) -> None:
    path = str(DATA / "http_pipe.py")
    export_pipeline(load_pipeline(path), path, str(tmp_path), settings={"db.password": "pw"})
    monkeypatch.delenv("STREAMFN_SECRET_DB_PASSWORD", raising=False)
    with pytest.raises(ConfigError, match=r"\$STREAMFN_SECRET_DB_PASSWORD is not set; it comes from secret "
                                          r"'events-secrets' key 'db.password'"):
        load_spec(str(tmp_path / "function.yaml"))
    monkeypatch.setenv("STREAMFN_SECRET_DB_PASSWORD", "from-the-secret")
    assert load_spec(str(tmp_path / "function.yaml"))[1]["db.password"] == "from-the-secret"


def test_build_rejects_bad_spec_settings() -> None:
    pipeline = load_pipeline(str(DATA / "http_pipe.py"))
    with pytest.raises(ConfigError, match="spec.gpu must be a whole number, got 'many'"):
        build_spec(pipeline, str(DATA / "http_pipe.py"), settings={"spec.gpu": "many"})


def test_streamfn_run_runs_an_exported_spec(tmp_path: Path) -> None:
    """export, then `streamfn run function.yaml`: the spec's env reaches the pipeline's code."""
    src, out, run = tmp_path / "in", tmp_path / "out", tmp_path / "run"
    src.mkdir()
    (src / "a.jsonl").write_text("".join(json.dumps({"sym": s, "volume": v}) + "\n"
                                         for s, v in [("A", 0), ("B", 5), ("C", 9), ("D", 2)]))
    env = {**os.environ, "IN_DIR": str(src), "OUT_DIR": str(out), "RUN_DIR": str(run), "MIN_VOLUME": "0"}
    path = str(DATA / "files_pipe.py")
    export_dir = tmp_path / "export"
    settings = {"env.IN_DIR": str(src), "env.OUT_DIR": str(out), "env.RUN_DIR": str(run), "env.MIN_VOLUME": "4"}
    cmd = [sys.executable, "-m", "streamfn.cli", "export", path, "-o", str(export_dir)]
    cmd += [f"--set={k}={v}" for k, v in settings.items()]
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=120)
    run_env = {k: v for k, v in env.items() if k not in ("IN_DIR", "OUT_DIR", "RUN_DIR", "MIN_VOLUME")}
    done = subprocess.run([sys.executable, "-m", "streamfn.cli", "run", str(export_dir / "function.yaml"),
                           "--until-idle", "--quiet"], env=run_env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = pl.concat([pl.read_ndjson(f) for f in glob.glob(str(out / "**" / "*.jsonl"), recursive=True)])
    assert sorted(rows["sym"].to_list()) == ["B", "C"]  # MIN_VOLUME=4 came from the spec
