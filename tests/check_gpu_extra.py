"""Check that the `gpu` extra resolves with pip on Linux x86-64 (CUDA 12) beside streamfn's own
dependencies, without a GPU and without installing anything: `pip install --dry-run` for that
platform. Needs the package index (network), so it is a CI step, not a unit test:

    python tests/check_gpu_extra.py          # exit 0 and the resolved cudf/polars/pandas versions
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
             "manylinux_2_17_x86_64", "manylinux2014_x86_64", "linux_x86_64"]


def requirements() -> list[str]:
    """streamfn's dependencies plus its `gpu` extra, read from pyproject.toml."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return list(project["dependencies"]) + list(project["optional-dependencies"]["gpu"])


def main() -> int:
    """Resolve; print what pip would install; 0 when it resolves."""
    reqs = requirements()
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
               "--target", str(Path(tmp) / "target"),  # older pips take platform options only with a target
               "--report", str(report), "--only-binary=:all:", "--python-version", "3.11",
               "--implementation", "cp"]
        cmd += [arg for p in PLATFORMS for arg in ("--platform", p)]
        done = subprocess.run(cmd + reqs, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"the gpu extra does not resolve: {' '.join(reqs)}\n{done.stderr[-3000:]}", file=sys.stderr)
            return 1
        installed = {i["metadata"]["name"].lower(): i["metadata"]["version"]
                     for i in json.loads(report.read_text())["install"]}
    picked = {k: installed.get(k) for k in ("cudf-cu12", "polars", "pandas", "pyarrow", "cupy-cuda12x")}
    print(json.dumps({"resolves": True, "packages": len(installed), **picked}))
    return 0 if picked["cudf-cu12"] and picked["polars"] else 1


if __name__ == "__main__":
    sys.exit(main())
