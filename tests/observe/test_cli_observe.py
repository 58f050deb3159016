"""`streamfn run --metrics-port` and `streamfn status URL`, as separate processes."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from tests.observe.conftest import get, get_json, wait_for

PIPELINE = """
import polars as pl
import streamfn as sf
from streamfn.connectors import files, memory

p = sf.Pipeline("watched", run_dir={run_dir!r}, checkpoint_interval=0.2)
ticks = p.source(files.ndjson({data!r}, watch=True, watch_interval=0.1, schema={{"x": pl.Int64}}), name="ticks")
p.stage(ticks, name="keep")(lambda df: df.filter(pl.col("x") > 0)).sink(memory.sink(name="out"))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _streamfn(*args: str) -> list[str]:
    return [sys.executable, "-m", "streamfn.cli", *args]


def test_streamfn_run_serves_status_and_streamfn_status_reads_it(tmp_path: Path):
    data = tmp_path / "in"
    data.mkdir()
    (data / "a.jsonl").write_text("".join(json.dumps({"x": i}) + "\n" for i in range(-5, 95)))
    script = tmp_path / "job.py"
    script.write_text(PIPELINE.format(run_dir=str(tmp_path / "run"), data=str(data / "*.jsonl")))
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    job = subprocess.Popen(_streamfn("run", str(script), "--metrics-port", str(port)), env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def read_all() -> dict | None:
            try:
                status = get_json(url + "/status")
            except OSError:
                return None
            return status if status["nodes"] and status["nodes"][-1]["rows_out"] == 94 else None
        status = wait_for(read_all, what="the job to read the file")
        assert status["pipeline"] == "watched" and status["state"] == "running"
        assert get(url + "/readyz")[0] == 200
        assert "streamfn_records_out_total" in get(url + "/metrics")[2].decode()
        shown = subprocess.run(_streamfn("status", f"127.0.0.1:{port}"), env=env, capture_output=True,
                               text=True, timeout=60)
        assert shown.returncode == 0, shown.stderr
        assert shown.stdout.startswith("watched  running  health=ok")
        assert "keep " in shown.stdout and "ticks " in shown.stdout
    finally:
        job.send_signal(signal.SIGTERM)  # a graceful stop: finish the batch in flight, commit, exit
        out, err = job.communicate(timeout=60)
    assert job.returncode == 0, err
    assert "stopped by signal SIGTERM" in out
    gone = subprocess.run(_streamfn("status", url), env=env, capture_output=True, text=True, timeout=60)
    assert gone.returncode == 1 and "cannot read the status" in gone.stderr
