"""The state code hash: what a checkpoint's state depends on, so an incompatible change is caught."""
from __future__ import annotations

import hashlib
import inspect
from collections.abc import Iterable
from typing import Any

import polars as pl

from streamfn.pipeline import Node


def state_code_hash(nodes: Iterable[Node]) -> str:
    """A short hash of every stateful stage: its name, kind, spec and (for keyed functions) code.

    Stateless stages are left out: changing a filter does not make saved windows unreadable.
    """
    digest = hashlib.sha256()
    for node in nodes:
        state = node.options.get("state")
        if node.operator is None and state is None:
            continue
        digest.update(node.name.encode())
        if node.operator is not None:
            module, factory, spec = node.operator
            digest.update(f"{module}.{factory}".encode())
            digest.update(_text(spec).encode())
        if state is not None:
            digest.update(_text(state).encode())
            digest.update(_source(node.fn).encode())
    return digest.hexdigest()[:16]


def _text(value: Any) -> str:
    if isinstance(value, pl.Expr):
        return str(value)
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_text(v)}" for k, v in sorted(value.items())) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_text(v) for v in value) + "]"
    return repr(value)


def _source(fn: Any) -> str:
    try:
        return inspect.getsource(fn)
    except (OSError, TypeError):  # defined in a REPL: fall back to the bytecode
        code = getattr(fn, "__code__", None)
        return code.co_code.hex() if code is not None else repr(fn)
