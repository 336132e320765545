"""The engine's model reads only what it runs: no project file, no data readers."""

from __future__ import annotations

import json
import subprocess
import sys

READ_ONLY_BY_JOBS = ("gatemix.project", "gatemix.data_sources", "gatemix.data_tables")


def _gatemix_modules_after_import(module: str) -> list[str]:
    code = (f"import json, sys, {module}; "
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('gatemix'))))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_the_composite_model_imports_neither_the_project_nor_the_data_readers():
    loaded = _gatemix_modules_after_import("gatemix.engine.composite_model")
    assert "gatemix.engine.composite_model" in loaded
    assert not set(READ_ONLY_BY_JOBS) & set(loaded)
    assert "gatemix.engine.pack" not in loaded
