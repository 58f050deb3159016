"""Bad input, fuzzed: whatever the bytes, the job does not crash and every record is accounted for."""
from __future__ import annotations

import io
import json

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import streamfn as sf
from streamfn.cli import main as cli_main
from streamfn.connectors import files, memory

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
SCHEMA = {"n": pl.Int64, "s": pl.String}

good_record = st.builds(lambda n, s: json.dumps({"n": n, "s": s}).encode(),
                        st.integers(-2**62, 2**62), st.text(max_size=8))
junk_line = st.binary(min_size=1, max_size=40).filter(lambda b: b"\n" not in b and b"\r" not in b and b.strip())


def run_file(tmp_path, name: str, data: bytes, connector) -> tuple[sf.RunSummary, pl.DataFrame]:
    (tmp_path / name).write_bytes(data)
    p = sf.Pipeline("fuzz", run_dir=str(tmp_path / "run"), batch_rows=7)
    out = memory.sink()
    p.source(connector(str(tmp_path / name))).sink(out)
    return p.run(until_idle=True, handle_signals=False), out.frame()


@FUZZ
@given(lines=st.lists(st.one_of(good_record, junk_line), max_size=40))
def test_ndjson_every_line_is_a_row_or_a_dead_letter(tmp_path, lines):
    summary, out = run_file(tmp_path, "f.jsonl", b"\n".join(lines) + b"\n",
                            lambda u: files.ndjson(u, schema=SCHEMA))
    assert out.height + summary.dead_letters == len(lines)
    good = [json.loads(x) for x in lines if x in set(lines) and _is_good(x)]
    assert out.height >= len(good)  # junk that happens to be a valid object may count as a row too


def _is_good(line: bytes) -> bool:
    try:
        value = json.loads(line)
    except ValueError:
        return False
    return isinstance(value, dict) and set(value) == {"n", "s"} and isinstance(value["n"], int)


csv_junk = st.text(alphabet=st.characters(blacklist_characters='"\n\r', blacklist_categories=("Cs",)),
                   min_size=1, max_size=30).filter(lambda t: t.strip())


@FUZZ
@given(rows=st.lists(st.one_of(st.builds(lambda n, s: f"{n},{s}", st.integers(-10**9, 10**9),
                                         st.from_regex(r"[a-z]{0,6}", fullmatch=True)), csv_junk), max_size=40))
def test_csv_every_row_is_a_row_or_a_dead_letter(tmp_path, rows):
    data = ("n,s\n" + "".join(r + "\n" for r in rows)).encode()
    summary, out = run_file(tmp_path, "f.csv", data, lambda u: files.csv(u, schema=SCHEMA))
    assert out.height + summary.dead_letters == len(rows)


@FUZZ
@given(data=st.binary(max_size=300))
def test_csv_with_any_bytes_never_crashes(tmp_path, data):
    run_file(tmp_path, "f.csv", b"n,s\n" + data, lambda u: files.csv(u, schema=SCHEMA))


def _valid_ipc(fmt: str) -> bytes:
    frame = pl.DataFrame({"n": list(range(50)), "s": ["x"] * 50})
    buf = io.BytesIO()
    (frame.write_ipc if fmt == "arrow" else frame.write_parquet)(buf)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["arrow", "parquet"])
@FUZZ
@given(cut=st.integers(0, 2000), noise=st.binary(max_size=64), flip=st.integers(0, 2000))
def test_corrupt_arrow_and_parquet_files_become_dead_letters(tmp_path, fmt, cut, noise, flip):
    data = bytearray(_valid_ipc(fmt))[: cut or None] + noise
    if data and flip < len(data):
        data[flip] ^= 0xFF
    summary, out = run_file(tmp_path, f"f.{fmt}", bytes(data), lambda u: getattr(files, fmt)(u))
    assert out.height <= 50
    if out.height < 50 and out.height == 0:
        assert summary.dead_letters >= 1 or len(data) == 0


WORDS = ["run", "graph", "convert", "export", "table", "--until-idle", "--set",
         "A=1", "=", "--workers", "0", "-1", "abc", "--format", "mermaid", "png", "nope.py", "x.ipynb", "--port",
         "99999", "--log-format", "xml", "--log-level", "loud", "-o", "--data", "--help-me", "", "::", "p.py:q"]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(argv=st.lists(st.sampled_from(WORDS), max_size=6))
def test_any_command_line_gets_an_exit_code_never_a_traceback(argv, capsys):
    try:
        code = cli_main(argv)
    except SystemExit as exc:  # --help / --version print and exit 0
        code = exc.code
    captured = capsys.readouterr()
    assert code in (0, 1, 2)
    assert "Traceback" not in captured.err
