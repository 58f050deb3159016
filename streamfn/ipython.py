"""`%load_ext streamfn`: test handlers in a live Jupyter kernel, with the notebook's magics.

Defines `context` (a `streamfn.testing.Context`), `Event` and `Response` in the notebook,
and the `%streamfn` line/cell magic (also as `%nuclio`, unless nuclio-jupyter's own magic is
loaded), so a notebook written for nuclio-jupyter runs its test cells against streamfn:

- `env KEY=VALUE` / `%%streamfn env` and `env_file PATH` set the kernel's environment now;
- `%%streamfn handler [NAME]` defines the handler the cell describes;
- `cmd`, `config`, `deploy`, `build`, `export` are what `streamfn export` reads: here they
  only say so, and run nothing.
"""
from __future__ import annotations

import os
from typing import Any

from streamfn import notebook, testing
from streamfn.events import Response

_SPEC_ONLY = ("cmd", "config", "deploy", "build", "export", "mount", "add")


def load(ipython: Any) -> None:
    """Install the names and magics in an IPython shell."""
    ipython.push({"context": testing.Context(), "Event": testing.Event, "Response": Response})

    def magic(line: str, cell: str | None = None) -> None:
        run_magic(ipython, line, cell)

    magic.__doc__ = __doc__
    ipython.register_magic_function(magic, magic_kind="line_cell", magic_name="streamfn")
    if "nuclio" not in ipython.magics_manager.magics.get("line", {}):
        ipython.register_magic_function(magic, magic_kind="line_cell", magic_name="nuclio")


def run_magic(ipython: Any, line: str, cell: str | None) -> None:
    """Apply one magic in the live kernel."""
    name, _, args = line.strip().partition(" ")
    body = cell.splitlines() if cell is not None else []
    if not name:
        print("usage: %streamfn env|env_file|handler|cmd|config|deploy|export ...")
        return
    if name == "handler":
        handler_name = args.strip() or "handler"
        ipython.run_cell(notebook.handler_code(handler_name, body), store_history=False)
        return
    magics = notebook.Magics()
    notebook.apply_magic(name, args, body, magics)
    for key, value in magics.env.items():
        os.environ[key] = os.path.expandvars(value)
    for path in magics.env_files:
        notebook.load_env_file(path, base_dir=os.getcwd(), override=True)
    if name in _SPEC_ONLY:
        print(f"streamfn: '{name}' is kept for `streamfn export`; nothing runs here")
