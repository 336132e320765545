"""The ``[data]`` and ``[out_of_domain]`` tables of a project file, checked and parsed.

A domain's table names explicit splits or one pool, with per-domain overrides
of the ``[data]`` defaults; a source is a path or a ``{path, format, text_field,
split}`` table. This module turns the tables into ``DataSource`` and
``DomainData`` (``data_sources.py``), refusing with ``TableError``; it reads no
documents, so a project's tables are checked before any data is touched.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from gatemix.data_sources import (
    DATA_DEFAULTS,
    FORMATS,
    POOL,
    SPLITS,
    DataSource,
    DomainData,
    TableError,
    expect_type,
    kind_name,
    path_label,
    reject_unknown_keys,
    resolve_path,
)

SOURCE_KEYS = ("path", "format", "text_field", "split")


def check_settings(settings: Mapping, where: str) -> None:
    """The defaults of ``[data]``, or one domain's after its overrides."""
    if not expect_type(settings["text_field"], str, f"{where} text_field"):
        raise TableError(f"{where} text_field must not be empty")
    expect_type(settings["seed"], int, f"{where} seed")
    for key in ("gate_fraction", "eval_fraction"):
        if not 0 < expect_type(settings[key], float, f"{where} {key}") < 1:
            raise TableError(f"{where} {key} must be between 0 and 1, got {settings[key]}")
    if settings["gate_fraction"] + settings["eval_fraction"] >= 1:
        raise TableError(f"{where} gate_fraction + eval_fraction must leave documents to train on")


def parse_domain(name: str, table: Mapping, defaults: Mapping, root: Path) -> DomainData:
    """One ``[data.<name>]`` table: explicit splits or one pool, never both."""
    where = f"[data.{name}]"
    reject_unknown_keys(table, (*SPLITS, POOL, *DATA_DEFAULTS), f"in {where}")
    settings = {**defaults, **{key: table[key] for key in DATA_DEFAULTS if key in table}}
    check_settings(settings, where)
    keys = [key for key in (*SPLITS, POOL) if key in table]
    if POOL in keys and len(keys) > 1:
        raise TableError(
            f"{where} gives both {POOL} and {'/'.join(k for k in keys if k != POOL)}; use explicit "
            f"splits or one pool {POOL} split with the seed, not both")
    if not keys:
        raise TableError(f"{where} declares no data; give train/gate/eval or {POOL}")
    sources = {key: _source_list(table[key], f"{where} {key}", root, settings["text_field"])
               for key in keys}
    listed_in: dict[tuple[Path, str | None], str] = {}  # one DatasetDict may feed two splits
    for key, key_sources in sources.items():
        for source in key_sources:
            place = (source.path, source.split)
            if place in listed_in:
                raise TableError(f"{where}: {source.label} is listed twice ({listed_in[place]} "
                                 f"and {key}); a document belongs to one split")
            listed_in[place] = key
    return DomainData(name=name, sources=sources, seed=settings["seed"],
                      gate_fraction=float(settings["gate_fraction"]),
                      eval_fraction=float(settings["eval_fraction"]))


OUT_OF_DOMAIN_KEYS = ("eval", "text_field")


def parse_out_of_domain(table: object, defaults: Mapping, root: Path) -> tuple[DataSource, ...]:
    """``[out_of_domain]``: text from none of the domains, read only by reports (``eval = [...]``)."""
    where = "[out_of_domain]"
    table = expect_type(table, dict, where)
    reject_unknown_keys(table, OUT_OF_DOMAIN_KEYS, f"in {where}")
    if "eval" not in table:
        raise TableError(f"{where} declares no text; give eval = [\"<file or folder>\", ...]")
    text_field = expect_type(table.get("text_field", defaults["text_field"]), str,
                             f"{where} text_field")
    if not text_field:
        raise TableError(f"{where} text_field must not be empty")
    return _source_list(table["eval"], f"{where} eval", root, text_field)


def _source_list(value: object, where: str, root: Path, text_field: str) -> tuple[DataSource, ...]:
    if isinstance(value, (str, dict)):
        value = [value]
    if not isinstance(value, list):
        raise TableError(f"{where} must be a list of sources, got {kind_name(value)}")
    if not value:
        raise TableError(f"{where} lists no sources")
    return tuple(parse_source(entry, root=root, text_field=text_field, where=where)
                 for entry in value)


def parse_source(entry: object, *, root: Path, text_field: str, where: str) -> DataSource:
    """A path string, or a ``{path, format, text_field, split}`` table."""
    if isinstance(entry, str):
        entry = {"path": entry}
    if not isinstance(entry, dict):
        raise TableError(f"{where}: a source is a path or a table with a path, got {kind_name(entry)}")
    reject_unknown_keys(entry, SOURCE_KEYS, f"in a source table of {where}")
    for key, value in entry.items():
        if not (isinstance(value, str) and value):
            raise TableError(f"{where}: source {key} must be a non-empty string, got {value!r}")
    if "path" not in entry:
        raise TableError(f"{where}: a source table needs a path")
    path = resolve_path(entry["path"], root)
    if "format" in entry and entry["format"] not in FORMATS:
        raise TableError(f"{where}: unknown format {entry['format']!r} for source {path} "
                         f"(known: {', '.join(FORMATS)})")
    return DataSource(path=path, label=path_label(path, root),
                      text_field=entry.get("text_field", text_field),
                      format=entry.get("format"), split=entry.get("split"))
