"""Files readable in one sitting and functions that fit on a screen.

Every product module stays at or under ``MAX_MODULE_LINES`` and every function
(tests included) at or under ``MAX_FUNCTION_LINES``; an exception is listed
below with the reason it is one.
"""

from __future__ import annotations

import ast
from pathlib import Path

from import_graph import REPO_ROOT, product_modules

MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60

# "path:function" or "path" -> why it may be longer.
EXCEPTIONS: dict[str, str] = {}


def _test_files() -> list[Path]:
    return sorted((REPO_ROOT / "tests").rglob("*.py"))


def _function_lengths(path: Path) -> dict[str, int]:
    tree = ast.parse(path.read_text(), str(path))
    return {
        f"{path.relative_to(REPO_ROOT)}:{node.name}": node.end_lineno - node.lineno + 1
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
    }


def test_every_module_is_at_most_400_lines():
    too_long = {}
    for path in list(product_modules().values()) + _test_files():
        name = str(path.relative_to(REPO_ROOT))
        lines = len(path.read_text().splitlines())
        if lines > MAX_MODULE_LINES and name not in EXCEPTIONS:
            too_long[name] = lines
    assert too_long == {}


def test_every_function_is_at_most_60_lines():
    too_long = {}
    for path in list(product_modules().values()) + _test_files():
        for name, lines in _function_lengths(path).items():
            if lines > MAX_FUNCTION_LINES and name not in EXCEPTIONS:
                too_long[name] = lines
    assert too_long == {}


def test_every_listed_exception_still_exists_and_says_why():
    known = {str(p.relative_to(REPO_ROOT)) for p in product_modules().values()}
    for path in list(product_modules().values()) + _test_files():
        known.update(_function_lengths(path))
    for name, reason in EXCEPTIONS.items():
        assert name in known, f"{name} is listed as an exception but no longer exists"
        assert len(reason.split()) >= 4, f"{name}: say why it is an exception"


def test_the_length_check_counts_a_long_function(tmp_path):
    source = tmp_path / "long.py"
    source.write_text("def long():\n" + "    x = 1\n" * 70)
    source = source.rename(REPO_ROOT / "tests" / "house" / "_probe_long.py")
    try:
        assert _function_lengths(source) == {"tests/house/_probe_long.py:long": 71}
    finally:
        source.unlink()
