"""Fitting parsed rows to a schema: text values are parsed in bulk, and rows whose values
do not fit are split off (to the dead letters) instead of failing the batch."""
from __future__ import annotations

import polars as pl

from streamfn.errors import ConfigError

_TRUE = ["true", "t", "yes", "y", "1"]
_FALSE = ["false", "f", "no", "n", "0"]


def parse_text(expr: pl.Expr, dtype: pl.DataType) -> pl.Expr:
    """Parse a text column into `dtype`, giving null where a value does not parse."""
    if dtype == pl.String:
        return expr
    if dtype == pl.Boolean:
        lowered = expr.str.strip_chars().str.to_lowercase()
        return (pl.when(lowered.is_in(_TRUE)).then(True)
                .when(lowered.is_in(_FALSE)).then(False).otherwise(None))
    if isinstance(dtype, pl.Datetime):
        return expr.str.to_datetime(time_unit=dtype.time_unit or "us", time_zone=dtype.time_zone,
                                    strict=False)
    if dtype == pl.Date:
        return expr.str.to_date(strict=False)
    return expr.str.strip_chars().cast(dtype, strict=False)


def infer_text_schema(frame: pl.DataFrame) -> pl.Schema:
    """Column types for text columns: Int64, Float64, Boolean where every value fits, else String."""
    inferred: dict[str, pl.DataType] = {}
    for name in frame.columns:
        column = frame.get_column(name)
        present = column.drop_nulls()
        inferred[name] = pl.String()
        for dtype in (pl.Int64(), pl.Float64(), pl.Boolean()):
            parsed = frame.select(parse_text(pl.col(name), dtype).alias(name)).get_column(name)
            if present.len() and parsed.drop_nulls().len() == present.len():
                inferred[name] = dtype
                break
    return pl.Schema(inferred)


def conform_text(frame: pl.DataFrame, schema: pl.Schema) -> tuple[pl.DataFrame, pl.Series | None, list[str]]:
    """Parse text columns to `schema`; return the good rows, a mask of bad rows, and why each is bad."""
    parsed = frame.select([
        (parse_text(pl.col(name), dtype) if name in frame.columns
         else pl.lit(None, dtype)).alias(name) for name, dtype in schema.items()])
    failed = [pl.col(n).is_not_null() & parsed.get_column(n).is_null().alias(n)
              for n in schema if n in frame.columns and schema[n] != pl.String]
    if not failed:
        return parsed, None, []
    flags = frame.select(failed)
    bad = flags.select(pl.any_horizontal(pl.all())).to_series()
    if not bad.any():
        return parsed, None, []
    reasons = []
    for row in flags.filter(bad).iter_rows():
        cols = [n for n, flag in zip(flags.columns, row) if flag]
        reasons.append("value does not fit the schema: " +
                       ", ".join(f"{c!r} is not {schema[c]}" for c in cols))
    return parsed.filter(~bad), bad, reasons


def conform_typed(frame: pl.DataFrame, schema: pl.Schema, where: str) -> pl.DataFrame:
    """Select and cast typed columns (Parquet, Arrow) to `schema`; a missing column is an error."""
    missing = [n for n in schema if n not in frame.columns]
    if missing:
        raise ConfigError(f"{where} has no column {', '.join(map(repr, missing))} that the schema "
                          f"names (it has {', '.join(frame.columns)})")
    try:
        return frame.select([pl.col(n).cast(t) for n, t in schema.items()])
    except pl.exceptions.PolarsError as exc:
        raise ConfigError(f"{where} does not fit the schema: {exc}".splitlines()[0]) from exc
