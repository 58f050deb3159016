"""Until-idle read-back on a real Tansu broker: one run writes Kafka topics and reads them back.

The writers are slow cron triggers, so the readers' first fetches see (nearly) empty partitions:
ending at the first fetch's high watermark would lose rows. The run must end by itself with
every row read back exactly once, through one topic and through a chain of two.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import polars as pl
import pytest

import streamfn as sf
from streamfn.connectors import cron, kafka, memory
from streamfn.errors import ConfigError
from tests.servers.kafka import KafkaServer

pytestmark = pytest.mark.integration

SCHEMA = {"id": pl.Int64, "symbol": pl.String, "price": pl.Float64}
TICKS, ROWS = 12, 400


def rows(start: int, n: int) -> pl.DataFrame:
    """Rows with ids start..start+n-1."""
    ids = pl.int_range(start, start + n, eager=True)
    return pl.DataFrame({"id": ids, "symbol": "S" + (ids % 7).cast(pl.String), "price": ids / 4})


class Feed:
    """A cron trigger's function: the next block of rows, ids counting up."""

    def __init__(self) -> None:
        self.calls = 0
        self.lock = threading.Lock()

    def __call__(self) -> pl.DataFrame:
        with self.lock:
            start, self.calls = self.calls * ROWS, self.calls + 1
        return rows(start, ROWS)


def test_a_topic_written_and_read_in_one_run_ends_after_its_writer(kafka_tansu: KafkaServer,
                                                                  tmp_path: Path) -> None:
    topic = kafka_tansu.topic_name("readback")
    p = sf.Pipeline("readback", run_dir=str(tmp_path), checkpoint_interval="0.2s")
    feed = p.source(cron.every("0.1s", Feed(), max_runs=TICKS, name="feed"))
    feed.sink(kafka.topic(topic, key="symbol", create=True, partitions=3), name="to_topic")
    back = memory.sink()
    p.source(kafka.topic(topic, schema=SCHEMA, group=kafka_tansu.topic_name("g")), name="from_topic").sink(back)
    summary = p.run(until_idle=True, settings=kafka_tansu.run_settings())
    assert summary.stopped_by == "end of input"
    got = back.frame().sort("id")
    assert got.equals(rows(0, TICKS * ROWS))  # every row, once, unchanged


def test_a_chain_of_two_topics_and_a_transactional_writer(kafka_tansu: KafkaServer, tmp_path: Path) -> None:
    first, second = kafka_tansu.topic_name("chain1"), kafka_tansu.topic_name("chain2")
    p = sf.Pipeline("chain", run_dir=str(tmp_path), checkpoint_interval="0.2s")
    feed = p.source(cron.every("0.1s", Feed(), max_runs=TICKS, name="feed"))
    feed.sink(kafka.topic(first, key="symbol", create=True, partitions=2), name="to_first")
    hop = p.source(kafka.topic(first, schema=SCHEMA, group=kafka_tansu.topic_name("g1")), name="from_first")
    doubled = hop.stage(lambda df: df.with_columns(price=pl.col("price") * 2), name="double")
    doubled.sink(kafka.topic(second, format="arrow", create=True, partitions=3, transactional=True),
                 name="to_second")
    back = memory.sink()
    p.source(kafka.topic(second, format="arrow", schema=SCHEMA, group=kafka_tansu.topic_name("g2")),
             name="from_second").sink(back)
    summary = p.run(until_idle=True, settings=kafka_tansu.run_settings())
    assert summary.stopped_by == "end of input"
    got = back.frame().sort("id")
    assert got["id"].to_list() == list(range(TICKS * ROWS))
    assert got["price"].to_list() == [i / 2 for i in range(TICKS * ROWS)]


def test_a_topic_no_sink_of_the_run_writes_still_ends_at_its_end(kafka_tansu: KafkaServer,
                                                                 tmp_path: Path) -> None:
    topic = kafka_tansu.topic_name("plain")
    p = sf.Pipeline("fill", run_dir=str(tmp_path / "a"))
    p.source(memory.source(rows(0, 3000))).sink(kafka.topic(topic, create=True, partitions=2))
    p.run(until_idle=True, settings=kafka_tansu.run_settings())
    q = sf.Pipeline("drain", run_dir=str(tmp_path / "b"))
    back = memory.sink()
    drained = q.source(kafka.topic(topic, schema=SCHEMA, group=kafka_tansu.topic_name("g")), name="drained")
    drained.sink(back)
    drained.sink(kafka.topic(kafka_tansu.topic_name("other"), create=True), name="elsewhere")  # another topic
    assert q.run(until_idle=True, settings=kafka_tansu.run_settings()).stopped_by == "end of input"
    assert back.frame().sort("id").equals(rows(0, 3000))


def test_stop_with_writers_ends_a_streaming_run_too(kafka_tansu: KafkaServer, tmp_path: Path) -> None:
    topic = kafka_tansu.topic_name("streaming")
    p = sf.Pipeline("streaming", run_dir=str(tmp_path), checkpoint_interval="0.2s")
    feed = p.source(cron.every("0.1s", Feed(), max_runs=TICKS, name="feed"))
    feed.sink(kafka.topic(topic, key="symbol", create=True, partitions=2), name="to_topic")
    back = memory.sink()
    p.source(kafka.topic(topic, schema=SCHEMA, group=kafka_tansu.topic_name("g"), stop_with_writers=True),
             name="from_topic").sink(back)
    summary = p.run(until_idle=False, settings=kafka_tansu.run_settings())  # as `streamfn run` without flags
    assert summary.stopped_by == "end of input"
    assert back.frame().sort("id").equals(rows(0, TICKS * ROWS))


def test_stop_with_writers_needs_a_writer_in_the_pipeline(kafka_tansu: KafkaServer, tmp_path: Path) -> None:
    topic = kafka_tansu.topic_name("nowriter")
    p = sf.Pipeline("nowriter", run_dir=str(tmp_path))
    p.source(kafka.topic(topic, create=True, stop_with_writers=True)).sink(memory.sink())
    with pytest.raises(ConfigError, match=f"stop_with_writers=True needs .* none writes {topic}"):
        p.run(until_idle=False, settings=kafka_tansu.run_settings())


PIPELINE_FILE = '''
import os
import polars as pl
import streamfn as sf
from streamfn.connectors import cron, files, kafka

TOPIC = os.environ["READBACK_TOPIC"]
calls = iter(range(10))


def feed():
    start = next(calls) * 300
    return pl.DataFrame({"id": range(start, start + 300), "symbol": [f"S{i % 5}" for i in range(300)]})


p = sf.Pipeline("readback_cli", run_dir=os.environ["RUN_DIR"], checkpoint_interval="0.2s")
p.source(cron.every("0.1s", feed, max_runs=10, name="feed")).sink(
    kafka.topic(TOPIC, key="symbol", create=True, partitions=3), name="to_topic")
back = p.source(kafka.topic(TOPIC, schema={"id": pl.Int64, "symbol": pl.String}, group=TOPIC + "-g"), name="back")
back.sink(files.ndjson(os.path.join(os.environ["RUN_DIR"], "back")), name="back_files")
'''


def test_streamfn_run_until_idle_reads_back_what_it_wrote(kafka_tansu: KafkaServer, tmp_path: Path) -> None:
    script = tmp_path / "readback_cli.py"
    script.write_text(PIPELINE_FILE)
    env = {**os.environ, "READBACK_TOPIC": kafka_tansu.topic_name("cli"), "RUN_DIR": str(tmp_path / "run")}
    settings = [arg for k, v in kafka_tansu.settings.items() for arg in ("--set", f"{k}={v}")]
    done = subprocess.run([sys.executable, "-m", "streamfn.cli", "run", str(script), "--until-idle",
                           "--brokers", kafka_tansu.bootstrap, *settings],
                          env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "stopped by end of input" in done.stdout
    got = pl.read_ndjson(sorted((tmp_path / "run" / "back").glob("*.jsonl")))
    assert sorted(got["id"]) == list(range(3000))
