"""Schemas of sources: given as a dict of polars types, or inferred once and then shared by
every partition of the source, so that all its batches have the same columns and types."""
from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import polars as pl

from streamfn.errors import ConfigError

Schema = Mapping[str, Any]


def normalise_schema(schema: Schema | pl.Schema | None) -> pl.Schema | None:
    """A schema given as a dict of polars types (or a pl.Schema), checked."""
    if schema is None:
        return None
    try:
        return pl.Schema(dict(schema))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"a schema maps column names to polars types, e.g. {{'price': pl.Float64}}: {exc}") from exc


class SchemaLock:
    """The schema all partitions of a source agree on: given, or inferred by the first reader."""

    def __init__(self, schema: pl.Schema | None) -> None:
        self._schema = schema
        self._lock = threading.Lock()

    def get(self) -> pl.Schema | None:
        return self._schema

    def settle(self, inferred: pl.Schema) -> pl.Schema:
        """Keep the first inferred schema (null columns as strings); later callers get the same."""
        with self._lock:
            if self._schema is None:
                self._schema = pl.Schema({n: (pl.String() if t == pl.Null else t) for n, t in inferred.items()})
            return self._schema
