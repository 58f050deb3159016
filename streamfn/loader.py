"""Loading the Pipeline a user's file defines (`streamfn run PATH[:attr]`)."""
from __future__ import annotations

import importlib
import os
import re
import sys
import traceback
import types
from typing import Any

from streamfn.errors import LoadError
from streamfn.pipeline import Pipeline

_ATTR = re.compile(r"^(?P<path>.+?):(?P<attr>[A-Za-z_][A-Za-z0-9_]*)$")


def split_target(target: str) -> tuple[str, str | None]:
    """'file.py:attr' -> ('file.py', 'attr'); a plain path -> (path, None)."""
    match = _ATTR.match(target)
    if match and not os.path.exists(target):
        return match.group("path"), match.group("attr")
    return target, None


def read_source(path: str) -> str:
    """The Python source of a .py file or of a notebook's kept cells."""
    if not os.path.exists(path):
        raise LoadError(f"no such file: {path}")
    if os.path.isdir(path):
        raise LoadError(f"{path} is a directory; give the pipeline's .py or .ipynb file")
    if path.endswith(".ipynb"):
        notebook = importlib.import_module("streamfn.notebook")
        return notebook.notebook_to_source(path)  # type: ignore[no-any-return]
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except UnicodeDecodeError as exc:
        raise LoadError(f"{path} is not UTF-8 text: {exc}") from exc


def load_module(path: str) -> dict[str, Any]:
    """Run a pipeline file as a module (not as __main__) and return its globals."""
    source = read_source(path)
    try:
        code = compile(source, path, "exec")
    except SyntaxError as exc:
        line = (exc.text or "").strip()
        raise LoadError(f"{exc.filename or path}:{exc.lineno}: {exc.msg}" + (f": {line}" if line else "")) from exc
    module = types.ModuleType("__streamfn_pipeline__")
    module.__file__ = os.path.abspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if folder not in sys.path:
        sys.path.insert(0, folder)  # so the file can import its neighbours
    sys.modules[module.__name__] = module
    try:
        exec(code, module.__dict__)
    except LoadError:
        raise
    except Exception as exc:
        raise LoadError(f"{_where(exc, path)}: {type(exc).__name__}: {exc}") from exc
    return module.__dict__


def _where(exc: BaseException, path: str) -> str:
    """'file.py:12' for the deepest frame of the user's file in a traceback."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == path]
    return f"{path}:{frames[-1].lineno}" if frames else path


def find_pipeline(namespace: dict[str, Any], path: str, attr: str | None) -> Pipeline:
    """The one Pipeline a file defines, the one named by attr, or a handler served over HTTP."""
    if attr is not None:
        if attr not in namespace:
            raise LoadError(f"{path} defines no {attr!r}")
        found = namespace[attr]
        if not isinstance(found, Pipeline):
            raise LoadError(f"{path}:{attr} is a {type(found).__name__}, not a streamfn Pipeline")
        return found
    pipelines = {id(v): (k, v) for k, v in namespace.items() if isinstance(v, Pipeline)}
    if len(pipelines) == 1:
        return next(iter(pipelines.values()))[1]
    if len(pipelines) > 1:
        names = ", ".join(sorted(k for k, _ in pipelines.values()))
        raise LoadError(f"{path} defines {len(pipelines)} pipelines ({names}); pick one with {path}:NAME")
    if callable(namespace.get("handler")):
        handler = importlib.import_module("streamfn.handler")
        return handler.pipeline_for_handler(namespace)  # type: ignore[no-any-return]
    raise LoadError(f"{path} defines no streamfn Pipeline (write p = sf.Pipeline(...)) and no handler(context, event)")


def load_pipeline(target: str) -> Pipeline:
    """Load `PATH[:attr]` (a .py file or a notebook) and return its Pipeline."""
    path, attr = split_target(target)
    namespace = load_module(path)
    return find_pipeline(namespace, path, attr)
