"""The serve-time gate stands alone: no module of ``gate/`` outside ``gate/fit/`` imports the fit."""

from __future__ import annotations

import ast
from pathlib import Path

import gatemix.gate

GATE_DIR = Path(gatemix.gate.__file__).parent


def _imported_modules(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
            names += [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
    return names


def test_no_serve_time_gate_module_imports_the_offline_fit():
    serve_time = [path for path in GATE_DIR.glob("*.py")]
    assert {path.stem for path in serve_time} >= {"mixing", "router", "posterior", "artifact", "registry"}
    offending = {
        path.name: [name for name in _imported_modules(path) if name.startswith("gatemix.gate.fit")]
        for path in serve_time
    }
    assert not {name: found for name, found in offending.items() if found}
