"""Writing a project file: the TOML that ``gatemix.project.load_project`` reads back.

Kept apart from reading (``project.py``) because the two share only the schema's
names: the reader checks and parses tables, the writer renders sources and
values as TOML, with paths made relative to the file's folder so the project
folder can move as a whole. The demo build and the tests write projects this way.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

from gatemix.atomic_write import write_atomically
from gatemix.data_sources import POOL, SPLITS, path_label, resolve_path
from gatemix.project import OUT_OF_DOMAIN
from gatemix.project_file import PROJECT_FILE_NAMES


def write_project_file(path: str | os.PathLike, *, name: str,
                       experts: Mapping[str, str | os.PathLike],
                       data: Mapping[str, Mapping[str, object]],
                       baselines: Mapping[str, str | os.PathLike] | None = None,
                       work_dir: str | os.PathLike | None = None,
                       defaults: Mapping[str, object] | None = None,
                       out_of_domain: object = None,
                       base: str | os.PathLike | None = None) -> Path:
    """Write a TOML project file: ``path`` is the ``.toml`` file, or a folder for ``gatemix.toml``.

    ``data`` is ``{domain: {"train"/"gate"/"eval" or "files": [sources], override: value}}``,
    a source a path or a source table; ``out_of_domain`` is the ``[out_of_domain]`` eval
    sources (a list, or one source); ``base`` the ``[base]`` model of adapter experts. Relative paths are the caller's (taken from
    the current directory); they are written relative to the file's folder when
    inside it, so the project folder can move as a whole.
    """
    file = Path(path).expanduser()
    if file.suffix.lower() != ".toml":
        file = file / PROJECT_FILE_NAMES[0]
    file = Path(os.path.abspath(file))
    root = file.parent
    lines = ["# gatemix project file: the experts and the data of each domain.",
             f"name = {_toml_value(name)}"]
    if work_dir is not None:
        lines.append(f"work_dir = {_toml_value(_relative(work_dir, root))}")
    if base is not None:
        lines += _toml_table("base", {"path": _relative(base, root)})
    lines += _toml_table("experts", {key: _relative(value, root) for key, value in experts.items()})
    if baselines:
        lines += _toml_table("baselines",
                             {key: _relative(value, root) for key, value in baselines.items()})
    lines += _toml_table("data", dict(defaults or {}))
    for domain, entries in data.items():
        lines += _toml_table(f"data.{_toml_key(domain)}", {
            key: _relative_sources(value, root) if key in (*SPLITS, POOL) else value
            for key, value in entries.items()
        })
    if out_of_domain is not None:
        lines += _toml_table(OUT_OF_DOMAIN, {"eval": _relative_sources(out_of_domain, root)})
    write_atomically(file, "\n".join(lines) + "\n")
    return file


def _relative(value: str | os.PathLike, root: Path) -> str:
    return path_label(resolve_path(value, Path.cwd()), root)


def _relative_sources(value: object, root: Path) -> list:
    entries = [value] if isinstance(value, (str, os.PathLike, Mapping)) else list(value)
    return [{**entry, "path": _relative(entry["path"], root)} if isinstance(entry, Mapping)
            else _relative(entry, root) for entry in entries]


def _toml_table(header: str, values: Mapping[str, object]) -> list[str]:
    return ["", f"[{header}]", *(f"{_toml_key(key)} = {_toml_value(value)}"
                                 for key, value in values.items())]


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_value(key)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, os.PathLike)):
        # A JSON string is a TOML basic string, except that TOML wants DEL escaped too.
        return json.dumps(os.fspath(value)).replace("\x7f", "\\u007f")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} to a project file: {value!r}")
