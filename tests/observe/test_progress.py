"""The progress view: redrawn in place on a terminal, log lines otherwise, nothing with quiet."""
from __future__ import annotations

import io
import logging

import polars as pl

import streamfn as sf
from streamfn import observe
from streamfn.connectors import memory
from streamfn.observe.progress import render_lines
from streamfn.runtime import Runtime
from tests.observe.conftest import LiveRun, wait_for


class Tty(io.StringIO):
    """A terminal to draw on: text in memory that says it is a tty."""

    def isatty(self) -> bool:
        return True


def _pipeline(run_dir: str) -> sf.Pipeline:
    p = sf.Pipeline("prog", run_dir=run_dir)
    src = p.source(memory.source({"0": pl.DataFrame({"x": range(100)}), "1": pl.DataFrame({"x": range(50)})},
                                 name="nums"))
    p.stage(src, name="half")(lambda df: df.filter(pl.col("x") % 2 == 0)).sink(memory.sink(name="out"))
    return p


def test_render_lines_shows_nodes_partitions_and_checkpoint():
    status = {
        "pipeline": "ticks", "state": "running", "health": "ok", "uptime_s": 12.0, "lanes_open": 1,
        "dead_letters": 3, "last_checkpoint": {"id": "cp-7", "age_s": 2.0},
        "nodes": [{"name": "ticks", "kind": "source", "rows_in_per_s": 12_500.0, "rows_out_per_s": 12_500.0,
                   "rows_in": 250_000, "rows_out": 250_000, "errors": 0},
                  {"name": "clean", "kind": "stage", "rows_in_per_s": 12_500.0, "rows_out_per_s": 11_000.0,
                   "rows_in": 250_000, "rows_out": 220_000, "errors": 3}],
        "partitions": [{"lane": "ticks[0]", "position": 250_000, "lag": 42}],
    }
    lines = render_lines(status)
    assert lines[0] == "ticks  running  health=ok  up 12s  lanes 1  dead letters 3  last checkpoint 2s ago (cp-7)"
    assert lines[2].split() == ["ticks", "source", "12.5k", "12.5k", "250.0k", "250.0k", "0"]
    assert lines[3].split() == ["clean", "stage", "12.5k", "11.0k", "250.0k", "220.0k", "3"]
    assert lines[4] == "  partitions: ticks[0] @250000 lag 42"


def test_live_view_redraws_in_place_on_a_terminal(run_dir):
    tty = Tty()
    run = LiveRun(run_dir, progress=True, stream=tty)
    try:
        run.wait_flowing()
        wait_for(lambda: tty.getvalue().count("\x1b[") >= 2, what="two redraws")
    finally:
        run.stop()
    text = tty.getvalue()
    assert "\x1b[" in text and "F\x1b[J" in text  # moved up and cleared the previous block
    last = text.rsplit("\x1b[J", 1)[-1]  # what is on screen at the end
    assert last.startswith("live  finished  health=ok")
    for name in ("ticks", "clean", "enrich", "out"):
        assert f"  {name} " in last


def test_log_lines_go_above_the_live_view(run_dir):
    tty, logs = Tty(), Tty()
    logger = logging.getLogger("streamfn")
    handler = logging.StreamHandler(logs)
    logger.addHandler(handler)
    try:
        runtime = Runtime(_pipeline(run_dir), until_idle=True, settings={}, handle_signals=False)
        with observe.start(runtime, progress=True, stream=tty) as obs:  # a runtime not yet running
            assert obs.progress is not None and obs.progress.live and runtime.observer is obs.observer
            obs.progress.draw()
            logging.getLogger("streamfn.test").warning("a warning while drawing")
            assert handler.stream is not logs  # routed through the live view
            runtime.run()
        assert handler.stream is logs  # given back on close
    finally:
        logger.removeHandler(handler)
    assert logs.getvalue().endswith("a warning while drawing\n")
    assert tty.getvalue().count("\x1b[") >= 1


def test_plain_progress_logs_a_line_when_not_a_terminal(run_dir):
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("streamfn.progress")
    keep, level = Keep(), logger.level
    logger.addHandler(keep)
    logger.setLevel(logging.INFO)
    try:
        summary = _pipeline(run_dir).run(until_idle=True, observe={"progress": True, "stream": io.StringIO()})
    finally:
        logger.removeHandler(keep)
        logger.setLevel(level)
    (final,) = [r for r in records if r.getMessage() == "progress (final)"]
    assert final.pipeline == "prog" and final.state == "finished"
    assert final.rows_out == {"nums": 150, "half": 75, "out": 75} == {
        n: summary.rows_out(n) for n in ("nums", "half", "out")}


def test_quiet_shows_nothing(run_dir):
    tty = Tty()
    p = _pipeline(run_dir)
    with observe.start(p, progress=True, quiet=True, stream=tty) as obs:
        p.run(until_idle=True)
    assert obs.progress is None and tty.getvalue() == ""
