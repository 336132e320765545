"""Finding a project file and reading its text into a table: TOML or YAML, one schema.

``gatemix.project`` checks the table; this module only locates the file and
parses it, so both file kinds fail with the same one-line ``ProjectError``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import yaml

from gatemix.data_sources import kind_name
from gatemix.errors import UserError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

PROJECT_FILE_NAMES = ("gatemix.toml", "gatemix.yaml", "gatemix.yml")


class ProjectError(UserError):
    """A project file, expert or data source a job refuses; always one line."""

    def __init__(self, message: str):
        # Parser messages (YAML's above all) span lines; a CLI error is one.
        super().__init__(re.sub(r"\s*\n\s*", " ", str(message)).strip())


def find_project_file(path: str | os.PathLike) -> Path:
    """The project file: ``path`` itself, or the one ``gatemix.{toml,yaml,yml}`` in folder ``path``."""
    path = Path(path).expanduser()
    if path.is_dir():
        found = [path / name for name in PROJECT_FILE_NAMES if (path / name).is_file()]
        if not found:
            raise ProjectError(
                f"{path}: no project file in this folder (expected {' or '.join(PROJECT_FILE_NAMES)})")
        if len(found) > 1:
            raise ProjectError(f"{path}: {' and '.join(f.name for f in found)}; keep one project file")
        path = found[0]
    elif not path.exists():
        raise ProjectError(f"project file {path} does not exist")
    if path.suffix.lower() not in (".toml", ".yaml", ".yml"):
        raise ProjectError(f"{path}: a project file is .toml, .yaml or .yml")
    return path.resolve()


def read_table(file: Path) -> dict:
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ProjectError(f"{file}: unreadable project file ({exc})") from exc
    is_toml = file.suffix.lower() == ".toml"
    try:
        table = tomllib.loads(text) if is_toml else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise ProjectError(f"{file}: not valid {'TOML' if is_toml else 'YAML'} ({exc})") from exc
    if table is None:  # an empty YAML file
        table = {}
    if not isinstance(table, dict):
        raise ProjectError(f"{file}: the top level must be a table of keys, got {kind_name(table)}")
    return table
