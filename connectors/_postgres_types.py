"""Arrow <-> PostgreSQL column types for the postgres connector: DDL, checks and casts."""
from __future__ import annotations

import re

import pyarrow as pa

from streamfn.connectors._exactly_once import SchemaMismatch, describe_schema
from streamfn.errors import ConfigError


def quote_ident(name: str) -> str:
    """A double-quoted SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    """A single-quoted SQL string literal (standard_conforming_strings is on since 9.1)."""
    return "'" + value.replace("'", "''") + "'"


def split_name(table: str) -> tuple[str, str]:
    """`schema.table` or `table` (schema public)."""
    parts = table.split(".")
    if len(parts) == 1 and parts[0]:
        return "public", parts[0]
    if len(parts) == 2 and all(parts):
        return parts[0], parts[1]
    raise ConfigError(f"postgres table name must be 'table' or 'schema.table', got {table!r}")


def pg_type(t: pa.DataType) -> str:
    """The PostgreSQL type a column of this Arrow type is created with."""
    if pa.types.is_boolean(t):
        return "boolean"
    if pa.types.is_int8(t) or pa.types.is_int16(t) or pa.types.is_uint8(t):
        return "smallint"
    if pa.types.is_int32(t) or pa.types.is_uint16(t):
        return "integer"
    if pa.types.is_int64(t) or pa.types.is_uint32(t):
        return "bigint"
    if pa.types.is_uint64(t):
        return "numeric(20,0)"
    if pa.types.is_float16(t) or pa.types.is_float32(t):
        return "real"
    if pa.types.is_float64(t):
        return "double precision"
    if pa.types.is_string(t) or pa.types.is_large_string(t) or t == pa.string_view():
        return "text"
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or t == pa.binary_view():
        return "bytea"
    if pa.types.is_date(t):
        return "date"
    if pa.types.is_time(t):
        return "time without time zone"
    if pa.types.is_timestamp(t):
        return "timestamp with time zone" if t.tz else "timestamp without time zone"
    if pa.types.is_duration(t):
        return "interval"
    if pa.types.is_decimal(t):
        return f"numeric({t.precision},{t.scale})"
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_list_view(t) \
            or pa.types.is_large_list_view(t):
        inner = pg_type(t.value_type)
        if inner.endswith("[]"):
            raise ConfigError(f"nested lists ({t}) have no PostgreSQL column type here")
        return inner + "[]"
    raise ConfigError(f"Arrow type {t} has no PostgreSQL column type here; cast it in a stage "
                      "(e.g. struct -> JSON string)")


def column_ddl(field: pa.Field) -> str:
    """`"name" type [not null]` for CREATE TABLE."""
    null = "" if field.nullable else " not null"
    return f"{quote_ident(field.name)} {pg_type(field.type)}{null}"


_SCALARS: dict[str, pa.DataType] = {
    "boolean": pa.bool_(), "smallint": pa.int16(), "integer": pa.int32(), "bigint": pa.int64(),
    "real": pa.float32(), "double precision": pa.float64(), "text": pa.large_string(),
    "bytea": pa.large_binary(), "date": pa.date32(), "time without time zone": pa.time64("us"),
    "timestamp without time zone": pa.timestamp("us"), "timestamp with time zone": pa.timestamp("us", "UTC"),
    "interval": pa.duration("us"), "json": pa.large_string(), "jsonb": pa.large_string(),
    "uuid": pa.large_string(),
}


def arrow_for_pg(type_name: str) -> pa.DataType | None:
    """The Arrow type rows are cast to before COPY into a column of this type (None: unknown)."""
    if type_name.endswith("[]"):
        inner = arrow_for_pg(type_name[:-2])
        return None if inner is None else pa.large_list(inner)
    if type_name in _SCALARS:
        return _SCALARS[type_name]
    if type_name.startswith(("character varying", "character(", "varchar", "char")):
        return pa.large_string()
    match = re.fullmatch(r"numeric\((\d+),(\d+)\)", type_name)
    if match:
        precision, scale = int(match.group(1)), int(match.group(2))
        return pa.decimal128(precision, scale) if precision <= 38 else pa.decimal256(precision, scale)
    return None


def _family(t: pa.DataType) -> str:
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_list_view(t) \
            or pa.types.is_large_list_view(t):
        return "list<" + _family(t.value_type) + ">"
    if pa.types.is_integer(t):
        return "int"
    if pa.types.is_floating(t):
        return "float"
    if pa.types.is_string(t) or pa.types.is_large_string(t) or t == pa.string_view():
        return "text"
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or t == pa.binary_view():
        return "bytes"
    if pa.types.is_timestamp(t):
        return "timestamptz" if t.tz else "timestamp"
    if pa.types.is_decimal(t):
        return "decimal"
    if pa.types.is_duration(t):
        return "duration"
    if pa.types.is_time(t):
        return "time"
    return str(t)


def check_and_cast(table: pa.Table, columns: list[tuple[str, str]], name: str) -> pa.Table:
    """The rows reordered and cast to the table's columns, or a SchemaMismatch saying why not."""
    expected = ", ".join(f"{n} {t}" for n, t in columns)
    given = describe_schema(table.schema)
    names = [n for n, _ in columns]
    if sorted(names) != sorted(table.schema.names):
        missing = [n for n in names if n not in table.schema.names]
        extra = [n for n in table.schema.names if n not in names]
        raise SchemaMismatch(f"postgres table {name}: expected columns ({expected}), the batch has ({given}); "
                             f"missing {missing}, unexpected {extra}: select/rename columns in a stage "
                             "or alter the table")
    fields = []
    for col, type_name in columns:
        target = arrow_for_pg(type_name)
        source = table.schema.field(col).type
        if target is None:
            target = source  # a type we do not map (e.g. an enum): let COPY decide
        elif _family(target) != _family(source) and not (pa.types.is_decimal(target)
                                                          and pa.types.is_integer(source)):
            raise SchemaMismatch(f"postgres table {name}: column {col} is {type_name}, the batch gives "
                                 f"{source}; expected ({expected}), given ({given})")
        fields.append(pa.field(col, target))
    return table.select(names).cast(pa.schema(fields))


def plain_columns(table: pa.Table) -> pa.Table:
    """Columns ADBC returns as opaque (numeric, uuid, json...) as decimals or strings."""
    if not any(isinstance(f.type, pa.OpaqueType) for f in table.schema):
        return table
    columns, fields = [], []
    for field, column in zip(table.schema, table.columns):
        if isinstance(field.type, pa.OpaqueType):
            column = pa.chunked_array([c.storage for c in column.chunks], type=field.type.storage_type)
            typmod = int((field.metadata or {}).get(b"POSTGRESQL:typmod", b"-1"))
            if field.type.type_name == "numeric" and typmod >= 4:
                # typmod = (precision << 16 | scale) + 4, as PostgreSQL stores it
                precision, scale = (typmod - 4) >> 16, (typmod - 4) & 0xFFFF
                column = column.cast(pa.decimal128(precision, scale) if precision <= 38
                                     else pa.decimal256(precision, scale))
            field = pa.field(field.name, column.type, field.nullable)
        columns.append(column)
        fields.append(field)
    return pa.Table.from_arrays(columns, schema=pa.schema(fields))
