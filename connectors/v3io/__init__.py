"""v3io (Iguazio) KV tables, TSDB tables and streams, through the v3io-frames client (`streamfn[v3io]`).

    p.source(v3io.stream("/streams/ticks", shards=4, schema={"volume": pl.Int64}))
    node.sink(v3io.kv("/tables/latest", key="symbol"))
    node.sink(v3io.tsdb("/tsdb/prices", time="ts", labels=["symbol"]))

Connection options, each an argument, else a `--set` setting, else an environment variable:
address (v3io.address, V3IO_FRAMESD: http://host:8080 or grpc://host:8081), container
(v3io.container, V3IO_CONTAINER), access key (v3io.access_key, V3IO_ACCESS_KEY; keep it in the
environment, never in code) and user (v3io.user, V3IO_USERNAME). See docs/v3io.md.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from streamfn.connectors.v3io._conn import Connection
from streamfn.connectors.v3io.streams import V3ioStream
from streamfn.connectors.v3io.tables import KVTable, TSDBTable

__all__ = ["Connection", "KVTable", "TSDBTable", "V3ioStream", "kv", "stream", "tsdb"]


def kv(table: str, *, key: str | None = None, save_mode: str = "updateItem", columns: Sequence[str] | None = None,
       address: str | None = None, container: str | None = None, access_key: str | None = None) -> KVTable:
    """A KV table: a sink that upserts each row as the item named by `key`, or a source reading every item.

    save_mode: "updateItem" (upsert, merging attributes), "overwriteItem" (upsert, replacing the item),
    "createNewItemsOnly" (a key that exists is an error) or "overwriteTable". As a source, `columns`
    picks attributes; the key comes back as a column named after the table's key.
    """
    return KVTable(table, Connection(address, container, access_key), key=key, save_mode=save_mode,
                   columns=columns)


def tsdb(table: str, *, time: str = "time", labels: Sequence[str] = (), metrics: Sequence[str] | None = None,
         rate: str = "1/s", create: bool = True, address: str | None = None, container: str | None = None,
         access_key: str | None = None) -> TSDBTable:
    """A TSDB table (sink): one sample per row at `time`, labelled by the `labels` columns.

    metrics: the numeric columns to store (default: every column but time and labels). With
    create=True the table is made at start with `rate` (e.g. "1/s") when it does not exist.
    """
    return TSDBTable(table, Connection(address, container, access_key), time=time, labels=labels,
                     metrics=metrics, rate=rate, create=create)


def stream(path: str, *, shards: int | None = None, seek: str = "earliest", schema: Mapping[str, Any] | None = None,
           create: bool = False, retention_hours: int = 24, metadata: bool = False, poll_interval: float = 0.2,
           address: str | None = None, container: str | None = None, access_key: str | None = None) -> V3ioStream:
    """A v3io stream: a sink appending each row as a JSON record, or a source with one lane per shard.

    shards: the stream's shard count (needed to read it, and to create it with create=True).
    seek: where a shard without a checkpoint starts, "earliest" or "latest". schema: column ->
    polars type to cast the JSON fields to (JSON numbers come back as floats; times as strings).
    metadata: keep `seq_number` and `stream_time`. poll_interval: seconds between reads of an idle shard.
    """
    return V3ioStream(path, Connection(address, container, access_key), shards=shards, seek=seek, schema=schema,
                      create=create, retention_hours=retention_hours, metadata=metadata,
                      poll_interval_s=poll_interval)
