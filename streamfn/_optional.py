"""Optional dependencies, imported at first use with a message naming the extra."""
from __future__ import annotations

import importlib
from types import ModuleType

from streamfn.errors import MissingDependency


def import_optional(module: str, *, extra: str) -> ModuleType:
    """Import a module that a pip extra provides."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        msg = (f"{module!r} is not installed; it comes with the "
               f"'{extra}' extra: pip install \"streamfn[{extra}]\"")
        raise MissingDependency(msg) from exc
