"""The cron trigger on apscheduler: bounded runs, failures, overlap, handlers, schedules."""
from __future__ import annotations

import logging
import threading
import time
from datetime import datetime, timezone

import polars as pl
import pytest

import streamfn as sf
from streamfn.connectors import cron, memory
from streamfn.errors import ConfigError
from tests.helpers import read_dead_letters


def run_collect(source, run_dir: str) -> tuple[pl.DataFrame, sf.RunSummary]:
    p = sf.Pipeline("cron_test", run_dir=run_dir)
    out = memory.sink()
    p.source(source, name="ticks").sink(out)
    summary = p.run(until_idle=True, handle_signals=False)
    return out.frame(), summary


def test_every_runs_a_bounded_number_of_times(run_dir):
    runs = []

    def poll() -> pl.DataFrame:
        runs.append(len(runs))
        return pl.DataFrame({"run": [len(runs)], "value": [len(runs) * 1.5]})

    frame, summary = run_collect(cron.every("20ms", poll, max_runs=3), run_dir)
    assert frame["run"].to_list() == [1, 2, 3]
    assert len(runs) == 3 and summary.stopped_by == "end of input"


def test_a_failing_run_is_a_dead_letter_and_the_schedule_goes_on(run_dir):
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) == 2:
            raise ConnectionError("api down")
        return [{"n": len(calls)}]

    frame, summary = run_collect(cron.every("20ms", flaky, max_runs=3), run_dir)
    assert frame["n"].to_list() == [1, 3]
    letters = read_dead_letters(run_dir)
    assert [(d["offset"], d["error"]) for d in letters] == [("run 2", "ConnectionError: api down")]
    assert summary.dead_letters == 1


def test_wrong_return_type_says_what_is_expected(run_dir):
    frame, _ = run_collect(cron.every("20ms", lambda: 42, max_runs=1, name="bad"), run_dir)
    assert frame.height == 0
    assert "returns a DataFrame, a list of dicts, a dict or None; got int" in read_dead_letters(run_dir)[0]["error"]


def test_overlapping_runs_are_skipped_and_logged(run_dir, caplog):
    running = []
    overlap = []
    lock = threading.Lock()

    def slow():
        with lock:
            running.append(1)
            overlap.append(len(running))
        time.sleep(0.15)  # longer than the interval: the next ticks would overlap
        with lock:
            running.pop()
        return {"done": True}

    with caplog.at_level(logging.WARNING, logger="streamfn.cron"):
        frame, _ = run_collect(cron.every("40ms", slow, max_runs=2), run_dir)
    assert frame.height == 2
    assert max(overlap) == 1  # never two runs at once
    skipped = [r for r in caplog.records if r.getMessage().startswith("cron run skipped")]
    assert skipped and skipped[0].source == "slow"


def test_a_nuclio_handler_runs_on_a_schedule(run_dir):
    def handler(context, event):
        context.user_data.n = getattr(context.user_data, "n", 0) + 1
        return {"trigger": event.trigger.kind, "n": context.user_data.n}

    frame, _ = run_collect(cron.every("10ms", handler, max_runs=2), run_dir)
    assert frame.to_dicts() == [{"trigger": "cron", "n": 1}, {"trigger": "cron", "n": 2}]


def test_schedule_reads_crontab_in_a_time_zone():
    source = cron.schedule("30 9 * * 1-5", lambda: None, timezone="America/New_York")
    assert source.describe() == "cron.schedule('30 9 * * 1-5')"
    saturday = datetime(2026, 11, 28, 12, 0, tzinfo=timezone.utc)
    fire = source._trigger.get_next_fire_time(None, saturday)  # noqa: SLF001
    assert (fire.weekday(), fire.hour, fire.minute) == (0, 9, 30)
    assert fire.utcoffset().total_seconds() == -5 * 3600


@pytest.mark.parametrize("make,message", [
    (lambda: cron.schedule("61 * * * *", lambda: None), "invalid cron expression"),
    (lambda: cron.schedule("* * * * *", lambda: None, timezone="Mars/Base"), "timezone"),
    (lambda: cron.every("0s", lambda: None), "above zero"),
    (lambda: cron.every("10s", lambda: None, max_runs=0), "at least 1"),
    (lambda: cron.every("soon", lambda: None), "expected a duration"),
    (lambda: cron.every("1s", "not a function"), "must be a function"),
])
def test_bad_schedules_are_clear_errors(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


@pytest.mark.parametrize("field,names", [
    ("1-5", "mon,tue,wed,thu,fri"), ("0", "sun"), ("7", "sun"), ("*/2", "sun,tue,thu,sat"),
    ("sat,sun", "sun,sat"), ("5-7", "sun,fri,sat"), ("*", "*"),
])
def test_crontab_weekdays_count_from_sunday(field, names):
    assert cron.crontab_weekdays(field) == names
