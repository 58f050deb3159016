"""Dependency direction: core never imports connectors or stateful; no connector imports another."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def imports_of(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def modules(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def test_core_does_not_import_connectors_or_stateful():
    for path in modules("streamfn"):
        bad = {m for m in imports_of(path) if m.startswith(("streamfn.connectors", "streamfn.stateful",
                                                            "connectors", "stateful"))}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_stateful_imports_no_connector():
    for path in modules("stateful"):
        bad = {m for m in imports_of(path) if m.startswith(("streamfn.connectors", "connectors"))}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_no_connector_imports_another_connector():
    for path in modules("connectors"):
        rel = path.relative_to(ROOT / "connectors")
        own = rel.parts[0].removesuffix(".py")
        for module in imports_of(path):
            if module.startswith("streamfn.connectors."):
                other = module.split(".")[2]
                # private modules (connectors/_x.py) are shared plumbing, not connectors
                assert other == own or other.startswith("_"), f"connectors/{rel} imports {module}"
            assert not module.startswith("connectors"), f"connectors/{rel} imports {module} (use streamfn.connectors)"
