"""The `streamfn` command, run as a real subprocess: output, exit codes, one-line errors."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import polars as pl
import pytest

PIPELINE = """
import os
import polars as pl
import streamfn as sf
from streamfn.connectors import files

p = sf.Pipeline("cli", run_dir={run_dir!r})
ticks = p.source(files.ndjson({inp!r}), name="ticks")

@p.stage(ticks)
def clean(df):
    return df.filter(pl.col("volume") > 0).with_columns(tag=pl.lit(os.environ.get("TAG", "none")))

clean.sink(files.parquet({out!r}), name="out")
"""


def streamfn(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "streamfn.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def project(tmp_path):
    rows = [{"symbol": "A", "ts": i, "price": 1.0 + i, "volume": i % 3} for i in range(30)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "pipe.py").write_text(PIPELINE.format(run_dir=str(tmp_path / "run"), inp=str(tmp_path / "in.jsonl"),
                                                      out=str(tmp_path / "out")))
    return tmp_path


def test_run_prints_the_summary_and_writes_the_output(project):
    result = streamfn("run", "pipe.py", "--until-idle", "--set", "TAG=blue", "--log-format", "json", cwd=project)
    assert result.returncode == 0, result.stderr
    assert "pipeline cli:" in result.stdout and "clean" in result.stdout
    out = pl.read_parquet(project / "out" / "*.parquet")
    assert out.height == 20 and out["tag"].unique().to_list() == ["blue"]
    logs = [json.loads(line) for line in result.stderr.splitlines()]
    assert any(e["message"] == "lane opened" and e["lane"].startswith("ticks[") for e in logs)
    assert all({"time", "level", "message"} <= e.keys() for e in logs)


def test_text_logs_and_log_level(project):
    result = streamfn("run", "pipe.py", "--log-format", "text", "--log-level", "warning", cwd=project)
    assert result.returncode == 0 and result.stderr == ""


def test_graph_as_text_and_mermaid(project):
    text = streamfn("graph", "pipe.py", cwd=project)
    assert text.returncode == 0 and "stage   clean  <- ticks" in text.stdout
    mermaid = streamfn("graph", "pipe.py", "--format", "mermaid", cwd=project)
    assert mermaid.stdout.startswith("flowchart LR") and "n0 --> n1" in mermaid.stdout


@pytest.mark.parametrize("args, code, message", [
    (["run", "missing.py"], 1, "streamfn: error: no such file: missing.py"),
    (["run", "pipe.py", "--frobnicate"], 2, "unrecognized arguments: --frobnicate"),
    (["run", "pipe.py", "--set", "NOEQUALS"], 2, "expected KEY=VALUE, got 'NOEQUALS'"),
    (["run", "pipe.py", "--workers", "0"], 2, "expected a number >= 1"),
    (["graph", "pipe.py", "--format", "png"], 2, "invalid choice: 'png'"),
    (["run", "pipe.py:nothing"], 1, "pipe.py defines no 'nothing'"),
    (["run", "pipe.py:os"], 1, "pipe.py:os is a module, not a streamfn Pipeline"),
    (["launch"], 2, "invalid choice: 'launch'"),
])
def test_bad_command_lines_get_one_clear_line(project, args, code, message):
    result = streamfn(*args, cwd=project)
    assert result.returncode == code
    assert message in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_syntax_error_shows_the_users_line(tmp_path):
    (tmp_path / "broken.py").write_text("import streamfn as sf\n\ndef f(:\n    pass\n")
    result = streamfn("run", "broken.py", cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("streamfn: error: broken.py:3:") and "def f(:" in result.stderr


def test_an_exception_while_loading_names_the_line(tmp_path):
    (tmp_path / "boom.py").write_text("x = 1\nraise RuntimeError('no config')\n")
    result = streamfn("run", "boom.py", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip() == "streamfn: error: boom.py:2: RuntimeError: no config"


def test_files_with_no_pipeline_or_several(tmp_path, project):
    (tmp_path / "empty.py").write_text("x = 1\n")
    result = streamfn("run", "empty.py", cwd=tmp_path)
    assert result.returncode == 1 and "defines no streamfn Pipeline" in result.stderr
    (project / "two.py").write_text((project / "pipe.py").read_text() + "\nq = sf.Pipeline('other')\n")
    result = streamfn("graph", "two.py", cwd=project)
    assert result.returncode == 1 and "defines 2 pipelines (p, q); pick one with two.py:NAME" in result.stderr
    chosen = streamfn("graph", "two.py:p", cwd=project)
    assert chosen.returncode == 0 and "clean" in chosen.stdout


def test_a_failing_stage_is_one_line_and_exit_1(tmp_path):
    (tmp_path / "bad.py").write_text(textwrap.dedent(f"""
        import streamfn as sf
        from streamfn.connectors import memory
        p = sf.Pipeline("bad", run_dir={str(tmp_path / 'run')!r})
        p.source(memory.source([{{"x": 1}}])).stage(lambda df: 42, name="answer").sink(memory.sink())
    """))
    result = streamfn("run", "bad.py", "--log-format", "json", cwd=tmp_path)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last == "streamfn: error: stage 'answer' failed on memory[0] at offset 0: returned int; " \
                   "a stage must return a polars DataFrame (or None to drop the batch)"
    assert "Traceback" not in result.stderr


def test_env_file_sets_the_environment(project):
    (project / "vars.env").write_text("# settings\nTAG=from-file\n")
    result = streamfn("run", "pipe.py", "--env-file", "vars.env", cwd=project)
    assert result.returncode == 0, result.stderr
    assert pl.read_parquet(project / "out" / "*.parquet")["tag"].unique().to_list() == ["from-file"]
    missing = streamfn("run", "pipe.py", "--env-file", "nope.env", cwd=project)
    assert missing.returncode == 1 and "no such env file: nope.env" in missing.stderr


def test_sigterm_finishes_the_batch_in_flight_and_flushes(tmp_path):
    # An unbounded source (a watched folder) only ends on a signal; what was read must be published.
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text("".join(json.dumps({"x": i}) + "\n" for i in range(100)))
    (tmp_path / "watch.py").write_text(textwrap.dedent(f"""
        import streamfn as sf
        from streamfn.connectors import files
        p = sf.Pipeline("watch", run_dir={str(tmp_path / 'run')!r}, checkpoint_interval="1h")
        p.source(files.ndjson({str(tmp_path / 'in')!r}, watch=True, watch_interval="50ms")) \\
            .sink(files.ndjson({str(tmp_path / 'out')!r}))
    """))
    proc = subprocess.Popen([sys.executable, "-m", "streamfn.cli", "run", "watch.py", "--log-format", "json"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # wait until the file was read (its temp output exists)
            if (tmp_path / "out").exists() and os.listdir(tmp_path / "out"):
                break
            time.sleep(0.05)
        time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    assert "stopped by signal SIGTERM" in stdout
    published = [n for n in os.listdir(tmp_path / "out") if not n.startswith(".")]
    rows = sum(len((tmp_path / "out" / n).read_text().splitlines()) for n in published)
    assert rows == 100
