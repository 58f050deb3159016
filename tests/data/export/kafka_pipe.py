"""A pipeline whose source says how it is triggered (spec_trigger), with a GPU stage."""
from collections.abc import Sequence

import polars as pl

import streamfn as sf
from streamfn.connectors import memory


class TopicSource(sf.Source):
    """Stands in for a Kafka topic in export tests: a real Source that describes its trigger."""

    def partitions(self) -> Sequence[str]:
        return []

    def open(self, partition, resume):
        raise NotImplementedError

    def spec_trigger(self) -> dict:
        return {"kind": "kafka", "topic": "ticks", "group": "vwap", "partitions": 4}


p = sf.Pipeline("vwap_gpu", checkpoint="s3://bucket/ckpt", checkpoint_interval="20s")
ticks = p.source(TopicSource(), name="ticks")


@p.stage(ticks, engine="gpu")
def clean(df: pl.DataFrame) -> pl.DataFrame:
    return df.filter(pl.col("volume") > 0)


clean.sink(memory.sink())
