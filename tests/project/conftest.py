"""Fixtures of the project tests: every project is built in the test's own tmp_path."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from project_builders import numbered_docs, write_expert, write_jsonl


@pytest.fixture
def make_expert(tmp_path):
    """``make_expert(name, **overrides)`` -> ``<tmp_path>/models/<name>``."""
    return lambda name, **overrides: write_expert(tmp_path / "models" / name, **overrides)


@pytest.fixture
def write_project(tmp_path):
    """``write_project(text, file_name="gatemix.toml")`` -> the written project file."""

    def write(text: str, file_name: str = "gatemix.toml") -> Path:
        path = tmp_path / file_name
        path.write_text(textwrap.dedent(text), encoding="utf-8")
        return path

    return write


@pytest.fixture
def code_expert(make_expert) -> Path:
    return make_expert("code")


@pytest.fixture
def code_pool(tmp_path, code_expert, write_project) -> Path:
    """A valid one-expert project file: 20 jsonl documents in one pool."""
    write_jsonl(tmp_path / "data" / "code.jsonl", numbered_docs(20))
    return write_project("""
        [experts]
        code = "models/code"
        [data.code]
        files = ["data/code.jsonl"]
    """)
