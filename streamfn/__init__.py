"""streamfn: plain Python functions over Arrow-backed batches, run as stream and ingestion jobs.

    import polars as pl
    import streamfn as sf
    from streamfn.connectors import files

    p = sf.Pipeline("ticks")
    ticks = p.source(files.ndjson("ticks-*.jsonl"))

    @p.stage(ticks)
    def clean(df: pl.DataFrame) -> pl.DataFrame:
        return df.filter(pl.col("volume") > 0)

    clean.sink(files.parquet("out/clean/"))
    p.run(until_idle=True)
"""
from streamfn.batch import Batch, Position
from streamfn.contracts import Reject, Sink, Source, SourcePartition, StageRunner, StateStore
from streamfn.errors import (Backpressure, ConfigError, DeadLetterLimit, EndOfInput, GraphError, LoadError,
                             MissingDependency, StageError, StreamfnError)
from streamfn.pipeline import Node, Pipeline
from streamfn.summary import RunSummary
from streamfn.windows import hopping, session, sliding, table, tumbling

__version__ = "0.1.0"


def load_ipython_extension(ipython: object) -> None:
    """`%load_ext streamfn` in Jupyter: `context`, `Event` and the %streamfn/%nuclio magics."""
    from streamfn.ipython import load

    load(ipython)


__all__ = [
    "Backpressure", "Batch", "ConfigError", "DeadLetterLimit", "EndOfInput", "GraphError", "LoadError",
    "MissingDependency", "Node", "Pipeline", "Position", "Reject", "RunSummary", "Sink", "Source",
    "SourcePartition", "StageError", "StageRunner", "StateStore", "StreamfnError", "__version__",
    "hopping", "session", "sliding", "table", "tumbling",
]
