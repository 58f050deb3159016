"""Split polars aggregations into partial aggregates that merge across batches.

`(pl.col("p") * pl.col("v")).sum() / pl.col("v").sum()` becomes two partials, `sum(p*v)` and
`sum(v)`, each computed per batch and summed into the state, and a final expression over the
merged partials. len/count/sum/min/max/mean split this way; anything else (median, n_unique,
first...) is kept exactly by holding the raw values of the columns it reads ("raw" mode).
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any

import polars as pl

_MERGE = {"Len": "sum", "Count": "sum", "Sum": "sum", "Min": "min", "Max": "max"}
_GROUP_DEPENDENT = ("Agg", "Len", "Window", "Over")


@dataclass(frozen=True)
class Plan:
    """How to keep some aggregations incrementally.

    partial: expressions computed per batch in a group_by (one column each);
    merge: expressions that combine partial columns in a group_by;
    final: expressions over merged partial columns giving the user's outputs;
    raw: when set, the columns kept as raw values (partials/merge then hold lists).
    """

    partial: tuple[pl.Expr, ...]
    merge: tuple[pl.Expr, ...]
    final: tuple[pl.Expr, ...]
    columns: tuple[str, ...]
    raw: bool
    names: tuple[str, ...]


def plan(aggs: tuple[pl.Expr, ...]) -> Plan:
    """Plan the aggregations; falls back to raw mode when one of them does not split."""
    names = tuple(e.meta.output_name() for e in aggs)
    if len(set(names)) != len(names):
        raise ValueError(f"two aggregations have the same output name ({', '.join(names)}): "
                         "give them different .alias() names")
    partial: list[pl.Expr] = []
    merge: list[pl.Expr] = []
    final: list[pl.Expr] = []
    seen: dict[str, str] = {}
    try:
        for expr, name in zip(aggs, names):
            tree = json.loads(expr.meta.serialize(format="json"))
            rewritten = _rewrite(tree, partial, merge, seen)
            final.append(_expr(rewritten).alias(name))
    except _NotSplittable:
        return _raw_plan(aggs, names)
    return Plan(tuple(partial), tuple(merge), tuple(final), tuple(p.meta.output_name() for p in partial),
                False, names)


def _raw_plan(aggs: tuple[pl.Expr, ...], names: tuple[str, ...]) -> Plan:
    columns = sorted({c for e in aggs for c in e.meta.root_names()})
    raw = tuple(f"__raw_{c}" for c in columns)
    return Plan(
        partial=tuple(pl.col(c).alias(r) for c, r in zip(columns, raw)),  # a list per group
        merge=tuple(pl.col(r).list.explode(keep_nulls=False, empty_as_null=False) for r in raw),
        final=aggs,
        columns=raw,
        raw=True,
        names=names,
    )


class _NotSplittable(Exception):
    pass


def _expr(tree: Any) -> pl.Expr:
    return pl.Expr.deserialize(io.StringIO(json.dumps(tree)), format="json")


def _contains(tree: Any, keys: tuple[str, ...]) -> bool:
    if isinstance(tree, dict):
        return any(k in keys or _contains(v, keys) for k, v in tree.items())
    if isinstance(tree, list):
        return any(_contains(v, keys) for v in tree)
    return tree in keys if isinstance(tree, str) else False


def _add(kind: str, agg_tree: Any, partial: list[pl.Expr], merge: list[pl.Expr],
         seen: dict[str, str]) -> dict[str, str]:
    """Register one partial aggregate (deduplicated) and return a column reference to it."""
    text = json.dumps(agg_tree, sort_keys=True)
    name = seen.get(text)
    if name is None:
        name = f"__p{len(seen)}"
        seen[text] = name
        expr = _expr(agg_tree)
        if kind in ("Len", "Count"):
            expr = expr.cast(pl.Int64)
        partial.append(expr.alias(name))
        merge.append(getattr(pl.col(name), _MERGE[kind])().alias(name))
    return {"Column": name}


def _rewrite(tree: Any, partial: list[pl.Expr], merge: list[pl.Expr], seen: dict[str, str]) -> Any:
    """Replace each aggregation in an expression tree by a reference to its merged partial."""
    if tree == "Len":
        return _add("Len", "Len", partial, merge, seen)
    if isinstance(tree, list):
        return [_rewrite(v, partial, merge, seen) for v in tree]
    if not isinstance(tree, dict):
        return tree
    if "Column" in tree or "Columns" in tree or "Window" in tree or "Over" in tree:
        raise _NotSplittable()  # a bare column (or a window) outside an aggregation
    if "Agg" in tree:
        (kind, payload), = tree["Agg"].items()
        inner = payload.get("input", payload) if isinstance(payload, dict) else payload
        if _contains(inner, _GROUP_DEPENDENT):
            raise _NotSplittable()
        if kind == "Mean":
            total = _add("Sum", {"Agg": {"Sum": inner}}, partial, merge, seen)
            count = _add("Count", {"Agg": {"Count": {"input": inner, "include_nulls": False}}},
                         partial, merge, seen)
            return {"BinaryExpr": {"left": total, "op": "TrueDivide", "right": count}}
        if kind not in _MERGE:
            raise _NotSplittable()
        return _add(kind, tree, partial, merge, seen)
    return {k: _rewrite(v, partial, merge, seen) for k, v in tree.items()}


def partials(frame: pl.DataFrame | pl.LazyFrame, keys: list[str], p: Plan) -> pl.LazyFrame:
    """Per-group partial aggregates of a frame."""
    return frame.lazy().group_by(keys).agg(*p.partial)


def merged(frame: pl.DataFrame | pl.LazyFrame, keys: list[str], p: Plan) -> pl.LazyFrame:
    """Combine rows of partials that share a group."""
    return frame.lazy().group_by(keys).agg(*p.merge)


def finished(frame: pl.DataFrame | pl.LazyFrame, keys: list[str], p: Plan) -> pl.LazyFrame:
    """The user's aggregations from merged partials."""
    if p.raw:
        columns = [c[len("__raw_"):] for c in p.columns]
        exploded = frame.lazy().explode(list(p.columns)).rename(dict(zip(p.columns, columns)))
        return exploded.group_by(keys, maintain_order=True).agg(*p.final)
    return frame.lazy().select(*keys, *p.final)
