"""Notebooks as pipelines: kept cells, magics, nuclio-jupyter conventions, and the CLI end to end."""
from __future__ import annotations

import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from streamfn.errors import LoadError
from streamfn.notebook import load_env_file, notebook_to_source, read_notebook
from streamfn.testing import Context, Event

DATA = Path(__file__).parent / "data" / "notebooks"
WORDS = str(DATA / "words.ipynb")
NUCLIO = str(DATA / "nuclio_handler.ipynb")


def write_notebook(path: Path, *cells) -> str:
    nb = new_notebook(cells=[c if not isinstance(c, str) else new_code_cell(c) for c in cells])
    nbformat.write(nb, str(path))
    return str(path)


def cli(*args: str, env: dict[str, str] | None = None, timeout_s: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streamfn.cli", *args], capture_output=True, text=True,
                          timeout=timeout_s, env={**os.environ, **(env or {})})


def test_kept_cells_leave_out_ignored_cells_and_magics():
    source = notebook_to_source(WORDS)
    assert "an ignored cell ran" not in source          # '# streamfn: ignore'
    assert "p.run(until_idle=True)" not in source       # tagged streamfn-ignore
    assert "import nuclio" not in source                # '# nuclio: ignore'
    assert "%matplotlib" not in source and "pip install" not in source
    assert "setdefault('GREETING'" in source            # the env magic, at the top
    assert source.index("setdefault('GREETING'") < source.index("import polars")
    compile(source, "words.py", "exec")


def test_magics_are_read_for_the_spec():
    magics = read_notebook(NUCLIO).magics
    assert magics.env == {"TARGET_LANG": "fr", "SECRET_TOKEN": "${MY_TOKEN}", "MODE": "test"}
    assert magics.packages == ["textblob"]
    assert magics.config == [("spec.maxReplicas", "=", "2")]
    assert magics.other == [("deploy", "-p streamfn -n shout")]


def test_line_magics_in_blocks_keep_the_block_valid(tmp_path):
    path = write_notebook(tmp_path / "nb.ipynb",
                          "for i in range(2):\n    %time x = i\n    !echo hi\ny = 1",
                          "%%bash\necho skipped", "%%time\nz = 2", "files = !ls\nw = 3")
    source = notebook_to_source(path)
    namespace: dict = {}
    exec(compile(source, path, "exec"), namespace)
    assert (namespace["y"], namespace["z"], namespace["w"]) == (1, 2, 3)
    assert "echo skipped" not in source and "files" not in namespace


def test_env_magic_forms_and_env_files(tmp_path, monkeypatch):
    (tmp_path / "app.env").write_text("# settings\nFROM_FILE=yes\nexport QUOTED='a b'\n")
    path = write_notebook(tmp_path / "nb.ipynb",
                          "%streamfn env_file app.env\n%streamfn env --config-only ONLY_SPEC=1\n"
                          "%nuclio env -l ONLY_LOCAL=1",
                          "import os\nseen = {k: os.environ.get(k) for k in "
                          "['FROM_FILE', 'QUOTED', 'ONLY_SPEC', 'ONLY_LOCAL', 'KEPT']}")
    for key in ("FROM_FILE", "QUOTED", "ONLY_SPEC", "ONLY_LOCAL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("KEPT", "mine")
    code = read_notebook(path)
    assert code.magics.spec_env == {"ONLY_SPEC": "1"} and code.magics.env == {"ONLY_LOCAL": "1"}
    namespace: dict = {}
    exec(compile(code.source, path, "exec"), namespace)
    assert namespace["seen"] == {"FROM_FILE": "yes", "QUOTED": "a b", "ONLY_SPEC": None,
                                 "ONLY_LOCAL": "1", "KEPT": "mine"}


def test_handler_cell_magic_becomes_a_handler(tmp_path):
    path = write_notebook(tmp_path / "nb.ipynb",
                          "%%nuclio handler\n"
                          "name = event.body.decode() if isinstance(event.body, bytes) else event.body['name']\n"
                          "f'hello {name}'  # nuclio: return",
                          "%%streamfn handler shout\nevent.body.upper()")
    code = read_notebook(path)
    assert code.magics.handlers == ["handler", "shout"]
    namespace: dict = {}
    exec(compile(code.source, path, "exec"), namespace)
    assert namespace["handler"](Context(), Event(body=b"ada")) == "hello ada"
    assert namespace["shout"](Context(), Event(body="hey")) == "HEY"


def test_start_and_end_markers(tmp_path):
    path = write_notebook(tmp_path / "nb.ipynb", "a = 1", "# nuclio: start-code\nb = 2", "c = 3",
                          "# nuclio: end-code", "d = 4")
    source = notebook_to_source(path)
    assert "a = 1" not in source and "b = 2" in source and "c = 3" in source and "d = 4" not in source


@pytest.mark.parametrize("content,message", [
    ("{not json", "is not a valid Jupyter notebook"),
    ('{"cells": "no", "metadata": {}, "nbformat": 4, "nbformat_minor": 5}', "is not a valid Jupyter notebook"),
])
def test_invalid_notebooks_are_one_line_errors(tmp_path, content, message):
    path = tmp_path / "bad.ipynb"
    path.write_text(content)
    with pytest.raises(LoadError, match=message) as info:
        notebook_to_source(str(path))
    assert "\n" not in str(info.value)


def test_syntax_error_names_the_cell(tmp_path):
    path = write_notebook(tmp_path / "nb.ipynb", "x = 1", "def broken(:\n    pass")
    with pytest.raises(LoadError, match=r"cell 2, line 1: .*mark it '# streamfn: ignore'"):
        notebook_to_source(path)


def test_missing_notebook_and_bad_env_file(tmp_path):
    with pytest.raises(LoadError, match="does not exist"):
        notebook_to_source(str(tmp_path / "nope.ipynb"))
    (tmp_path / "bad.env").write_text("NOEQUALS\n")
    with pytest.raises(LoadError, match="expected KEY=VALUE"):
        load_env_file(str(tmp_path / "bad.env"))


# -- through the CLI, as a subprocess -------------------------------------------------------------
@pytest.mark.integration
def test_streamfn_run_a_notebook(tmp_path):
    env = {"OUT_DIR": str(tmp_path / "out"), "RUN_DIR": str(tmp_path / "run")}
    done = cli("run", WORDS, "--until-idle", env=env)
    assert done.returncode == 0, done.stderr
    rows = _rows(tmp_path / "out")
    assert sorted((r["word"], r["len"], r["greeting"]) for r in rows) == [
        ("a", 1, "hello"), ("b", 2, "hello"), ("c", 2, "hello")]
    again = cli("run", WORDS, "--until-idle", "--set", "GREETING=hi",
                env={**env, "OUT_DIR": str(tmp_path / "out2")})
    assert again.returncode == 0, again.stderr
    rows = _rows(tmp_path / "out2")
    assert {r["greeting"] for r in rows} == {"hi"}  # --set wins over the notebook's default


@pytest.mark.integration
def test_streamfn_convert_and_graph(tmp_path):
    out = tmp_path / "words.py"
    done = cli("convert", WORDS, "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert out.read_text() == notebook_to_source(WORDS)
    graph = cli("graph", WORDS, env={"OUT_DIR": str(tmp_path / "o")})
    assert graph.returncode == 0, graph.stderr
    assert "count" in graph.stdout


@pytest.mark.integration
def test_streamfn_run_an_invalid_notebook_fails_in_one_line(tmp_path):
    bad = tmp_path / "bad.ipynb"
    bad.write_text("{not json")
    done = cli("run", str(bad), "--until-idle")
    assert done.returncode != 0
    assert "is not a valid Jupyter notebook" in done.stderr
    empty = write_notebook(tmp_path / "empty.ipynb", "x = 1", "# streamfn: ignore\np = 'not this'")
    nothing = cli("run", empty, "--until-idle")
    assert nothing.returncode != 0
    assert "defines no streamfn Pipeline" in nothing.stderr


@pytest.mark.integration
def test_a_nuclio_notebook_is_served_over_http(tmp_path):
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "streamfn.cli", "run", NUCLIO, "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "MY_TOKEN": "s3cret"}, cwd=tmp_path)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_ready(base, server)
        with httpx.Client() as client:
            as_json = client.post(base + "/", json={"text": "bonjour"})
            as_text = client.post(base + "/any/path", content=b"salut", headers={"content-type": "text/plain"})
            binary = client.post(base + "/", content=b"\xff\xfe", headers={"content-type": "application/octet-stream"})
            malformed = client.post(base + "/", content=b"{oops", headers={"content-type": "application/json"})
        assert as_json.json() == {"lang": "fr", "text": "BONJOUR", "mode": "test", "token": "s3cret"}
        assert as_text.json()["text"] == "SALUT"
        assert binary.status_code == 500 and binary.json()["error"] == "handler raised UnicodeDecodeError"
        assert "Traceback" not in binary.text
        assert malformed.json()["text"] == "{OOPS"  # as Nuclio: undecodable JSON stays bytes
    finally:
        server.send_signal(signal.SIGTERM)
        _, stderr = server.communicate(timeout=30)
    assert server.returncode == 0, stderr
    assert "called" in stderr  # the handler's structured log line


@pytest.mark.integration
def test_the_nlp_notebook_answers_over_http(tmp_path):
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "streamfn.cli", "run", str(DATA / "nlp.ipynb"),
                               "--port", str(port), "--set", "TO_LANG=de"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_ready(base, server)
        answer = httpx.post(base + "/", content=b"I havv a goood day", headers={"content-type": "text/plain"})
    finally:
        server.send_signal(signal.SIGTERM)
        _, stderr = server.communicate(timeout=30)
    assert answer.status_code == 200
    body = answer.json()
    assert body["corrected"] == "I have a good day" and body["polarity"] > 0
    assert body["lang"] == "de"  # --set wins over the notebook's %nuclio env default
    logged = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    sentiment = [entry for entry in logged if entry["message"] == "Sentiment"]
    assert sentiment and float(sentiment[0]["polarity"]) > 0  # info_with fields in the structured log


def _rows(folder: Path) -> list[dict]:
    return [json.loads(line) for f in sorted(glob.glob(f"{folder}/*.jsonl"))
            for line in Path(f).read_text().splitlines()]


def _wait_ready(base: str, process: subprocess.Popen, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"streamfn run exited: {process.communicate()[1]}")
        try:
            if httpx.get(base + "/readyz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise AssertionError("the served notebook did not become ready")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_load_ext_streamfn_in_a_live_ipython_shell(monkeypatch, capsys):
    from IPython.core.interactiveshell import InteractiveShell

    monkeypatch.setenv("MY_TOKEN", "t0k")
    monkeypatch.delenv("TARGET_LANG", raising=False)
    shell = InteractiveShell.instance()
    try:
        shell.run_line_magic("load_ext", "streamfn")
        for cell in ("%nuclio env TARGET_LANG=de",
                     "%%nuclio env\nSECRET=${MY_TOKEN}",
                     "%%nuclio handler\nname = event.body['name']\nf'{name} in ' + os.environ['TARGET_LANG']",
                     "%nuclio cmd pip install textblob",
                     "import os\nanswer = handler(context, Event(body={'name': 'ada'}))\n"
                     "context.logger.info_with('tested', answer=answer)"):
            result = shell.run_cell(cell)
            assert result.success, result.error_in_exec or result.error_before_exec
        assert shell.user_ns["answer"] == "ada in de"
        assert os.environ["TARGET_LANG"] == "de" and os.environ["SECRET"] == "t0k"
        out = capsys.readouterr().out
        assert "'cmd' is kept for `streamfn export`" in out and "tested  answer=ada in de" in out
    finally:  # the magics set these outside monkeypatch: remove them (monkeypatch.delenv would restore them)
        os.environ.pop("SECRET", None)
        os.environ.pop("TARGET_LANG", None)
        InteractiveShell.clear_instance()
