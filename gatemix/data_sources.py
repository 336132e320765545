"""A domain's data: its declared sources, their documents, and how one pool is split.

A source is a path (a file or a folder) and how to read it:

- ``jsonl``: one document per non-empty line, the string at ``line[text_field]``;
- ``parquet``: one document per row of the column ``text_field``;
- ``datasets``: a folder written by ``save_to_disk``, one document per row of the
  column ``text_field`` (a ``DatasetDict``: one ``split``, or all in name order);
- ``text``: one document per file, the whole file.

A folder read as ``jsonl``, ``parquet`` or ``text`` stands for every regular file
under it, recursively, sorted, hidden files and folders skipped.

Document ids are stable strings, so a recorded split names the same documents
tomorrow: ``<label>#<row>`` for row-based forms (``<label>#<split>/<row>`` for a
``DatasetDict``; a jsonl row is its 0-based line index), ``<label>`` for a text
file, where the label is the path relative to the project folder (absolute when
the source lies outside it). Empty and whitespace-only texts are dropped: they
carry nothing to fit on.

Errors here are ``DataSourceError`` (a file that cannot be read) and
``TableError`` (a badly typed or unknown key, raised while ``data_tables``
parses the tables); the project file wraps both with its own path.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from gatemix.errors import UserError

Document = tuple[str, str]  # (doc_id, text)

SPLITS = ("train", "gate", "eval")
POOL = "files"  # the key of a domain's one pool of sources, split with the seed
FORMATS = ("jsonl", "text", "parquet", "datasets")
DATA_DEFAULTS = {"text_field": "text", "seed": 0, "gate_fraction": 0.1, "eval_fraction": 0.1}
# Files that ``save_to_disk`` writes: a folder holding one is a saved dataset.
DATASETS_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
_SUFFIX_FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
_KIND_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "a boolean",
               dict: "a table", list: "a list"}


class DataSourceError(UserError):
    """A data source that cannot be read; one line naming the file."""


class TableError(UserError):
    """A key of the project's tables that is unknown or of the wrong type."""


def kind_name(value: object) -> str:
    return _KIND_NAMES.get(type(value), type(value).__name__)


def expect_type(value, kind: type, where: str):
    """``value`` if it is of ``kind`` (a bool is no number, an int is a float); else refuse."""
    ok = isinstance(value, (int, float) if kind is float else kind)
    if isinstance(value, bool) and kind is not bool:
        ok = False
    if not ok:
        raise TableError(f"{where} must be {_KIND_NAMES[kind]}, got {kind_name(value)} {value!r}")
    return value


def reject_unknown_keys(table: Mapping, known: Sequence[str], where: str) -> None:
    unknown = sorted(str(key) for key in table if key not in known)
    if unknown:
        raise TableError(f"unknown key(s) {', '.join(unknown)} {where} (known: {', '.join(known)})")


@dataclass(frozen=True)
class DataSource:
    """One declared source: an absolute path, the label its ids carry, and how to read it."""

    path: Path
    label: str
    text_field: str
    format: str | None = None  # None: inferred from the path when read
    split: str | None = None  # one split of a saved DatasetDict; None: all

    def resolved_format(self) -> str:
        return self.format or infer_format(self.path)


@dataclass(frozen=True)
class DomainData:
    """The declared sources of one domain and how its pool, if it has one, is split."""

    name: str
    sources: dict[str, tuple[DataSource, ...]]  # "train"/"gate"/"eval", or "files" -> sources
    seed: int
    gate_fraction: float
    eval_fraction: float

    @property
    def is_pool(self) -> bool:
        return POOL in self.sources


def resolve_path(value: str | os.PathLike, root: Path) -> Path:
    """An absolute, normalized path: ``~`` expanded, relative paths taken from ``root``."""
    path = Path(value).expanduser()
    return Path(os.path.normpath(path if path.is_absolute() else root / path))


def path_label(path: Path, root: Path) -> str:
    """How ids and records name a path: relative to the project folder when inside it."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


# ---- reading ----

def infer_format(path: Path) -> str:
    """The format a file's suffix, or a folder's contents, imply."""
    if path.is_dir():
        if any((path / marker).is_file() for marker in DATASETS_MARKERS):
            return "datasets"
        return "text"
    return _SUFFIX_FORMATS.get(path.suffix.lower(), "text")


def check_source(source: DataSource) -> None:
    """Refuse a source that cannot be read, without reading its documents."""
    if not source.path.exists():
        raise DataSourceError(f"data source {source.path} does not exist")
    source_format = source.resolved_format()
    if source_format == "datasets" and not source.path.is_dir():
        raise DataSourceError(
            f"{source.path}: a datasets source is a folder written by save_to_disk, not a file")
    if source.split is not None and source_format != "datasets":
        raise DataSourceError(f"{source.path}: split {source.split!r} applies only to a datasets "
                              f"folder; this source reads as {source_format}")


def read_sources(sources: Sequence[DataSource], where: str) -> list[Document]:
    """Every non-empty document of ``sources``, in order; refuses none at all, or one id twice."""
    documents: list[Document] = []
    for source in sources:
        try:
            documents.extend(read_documents(source))
        except DataSourceError as exc:
            raise DataSourceError(f"{where}: {exc}") from exc
    paths = ", ".join(str(source.path) for source in sources)
    if not documents:
        raise DataSourceError(
            f"{where} holds no documents ({paths}): no files, or only empty or blank texts")
    seen: set[str] = set()
    for doc_id, _ in documents:
        if doc_id in seen:
            raise DataSourceError(f"{where}: document {doc_id} is read twice ({paths})")
        seen.add(doc_id)
    return documents


def read_documents(source: DataSource) -> list[Document]:
    """Every non-empty document of one source, in source order."""
    check_source(source)
    source_format = source.resolved_format()
    if source_format == "datasets":
        documents = _read_datasets(source)
    else:
        reader = {"jsonl": _read_jsonl, "parquet": _read_parquet, "text": _read_text}[source_format]
        documents = (document for path, label in _files_of(source)
                     for document in reader(path, label, source.text_field))
    return [(doc_id, text) for doc_id, text in documents if text.strip()]


def files_under(folder: Path) -> list[Path]:
    """Every regular file under ``folder``, recursively, sorted, hidden files and folders skipped."""
    return sorted(
        path for path in folder.rglob("*")
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    )


def _files_of(source: DataSource) -> list[tuple[Path, str]]:
    """The files a file-based source reads, each with the label its ids carry."""
    if not source.path.is_dir():
        return [(source.path, source.label)]
    return [(path, f"{source.label}/{path.relative_to(source.path).as_posix()}")
            for path in files_under(source.path)]


def _read_jsonl(path: Path, label: str, text_field: str) -> Iterator[Document]:
    try:
        with path.open(encoding="utf-8") as handle:
            for index, line in enumerate(handle):
                if line.strip():
                    yield f"{label}#{index}", _jsonl_text(line, path, index + 1, text_field)
    except UnicodeDecodeError as exc:
        raise DataSourceError(f"{path}: not UTF-8 text ({exc})") from exc
    except OSError as exc:
        raise DataSourceError(f"{path}: unreadable ({exc})") from exc


def _jsonl_text(line: str, path: Path, line_number: int, text_field: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataSourceError(f"{path} line {line_number}: not JSON ({exc}); jsonl holds one "
                              "JSON object per line") from exc
    if not isinstance(record, dict) or text_field not in record:
        fields = ", ".join(sorted(record)) if isinstance(record, dict) else kind_name(record)
        raise DataSourceError(f"{path} line {line_number}: no {text_field!r} field (found: "
                              f"{fields}); set text_field for this source or domain")
    text = record[text_field]
    if not isinstance(text, str):
        raise DataSourceError(
            f"{path} line {line_number}: field {text_field!r} is {kind_name(text)}, not a string")
    return text


def _read_text(path: Path, label: str, text_field: str) -> Iterator[Document]:
    del text_field  # a text file is one document; it has no fields
    try:
        yield label, path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataSourceError(f"{path}: not UTF-8 text ({exc})") from exc
    except OSError as exc:
        raise DataSourceError(f"{path}: unreadable ({exc})") from exc


def _import_optional(module: str, path: Path, what: str) -> ModuleType:
    """Import pyarrow or datasets only when a source needs them: the base install has neither."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise DataSourceError(f"{path}: reading {what} needs the {module.split('.')[0]} package; "
                              "pip install 'gatemix[data]'") from exc


def _read_parquet(path: Path, label: str, text_field: str) -> Iterator[Document]:
    parquet = _import_optional("pyarrow.parquet", path, "parquet")
    try:
        columns = parquet.read_schema(path).names
    except Exception as exc:  # pyarrow raises several types for files it cannot parse
        raise DataSourceError(f"{path}: not a readable parquet file ({exc})") from exc
    if text_field not in columns:
        raise DataSourceError(f"{path}: no column {text_field!r} (columns: {', '.join(columns)}); "
                              "set text_field for this source or domain")
    values = parquet.read_table(path, columns=[text_field]).column(text_field).to_pylist()
    yield from _column_documents(values, f"{label}#", path, text_field)


def _read_datasets(source: DataSource) -> Iterator[Document]:
    datasets = _import_optional("datasets", source.path, "a datasets folder")
    try:
        loaded = datasets.load_from_disk(str(source.path))
    except Exception as exc:  # datasets raises several types for folders it cannot load
        raise DataSourceError(
            f"{source.path}: not a dataset saved with save_to_disk ({exc})") from exc
    if not isinstance(loaded, datasets.DatasetDict):
        if source.split is not None:
            raise DataSourceError(f"{source.path}: a single Dataset, not a DatasetDict; it has no "
                                  f"split {source.split!r} (drop split)")
        yield from _dataset_documents(loaded, f"{source.label}#", source)
        return
    if source.split is not None and source.split not in loaded:
        raise DataSourceError(
            f"{source.path}: no split {source.split!r} (splits: {', '.join(sorted(loaded))})")
    for split in [source.split] if source.split else sorted(loaded):
        yield from _dataset_documents(loaded[split], f"{source.label}#{split}/", source)


def _dataset_documents(dataset, id_prefix: str, source: DataSource) -> Iterator[Document]:
    if source.text_field not in dataset.column_names:
        raise DataSourceError(
            f"{source.path}: no column {source.text_field!r} (columns: "
            f"{', '.join(dataset.column_names)}); set text_field for this source or domain")
    yield from _column_documents(dataset[source.text_field], id_prefix, source.path,
                                 source.text_field)


def _column_documents(values: Iterable, id_prefix: str, path: Path,
                      text_field: str) -> Iterator[Document]:
    """One document per row; a null is an empty document, any other non-string is refused."""
    for row, text in enumerate(values):
        if text is None:
            continue
        if not isinstance(text, str):
            raise DataSourceError(
                f"{path}: row {row} of column {text_field!r} is {kind_name(text)}, not a string")
        yield f"{id_prefix}{row}", text


# ---- splitting and hashing ----

def split_documents(doc_ids: Sequence[str], *, seed: int, domain: str, gate_fraction: float,
                    eval_fraction: float) -> dict[str, list[str]]:
    """Seeded document-level split into train / gate / eval, each non-empty.

    The result depends only on the set of ids, the seed and the domain name, not
    on the order the ids come in. Every id lands in exactly one split. It is the
    demo corpus's rule, so a project and the demo split alike.
    """
    if len(set(doc_ids)) != len(doc_ids):
        raise DataSourceError(f"domain {domain!r} has duplicate document ids")
    if len(doc_ids) < len(SPLITS):
        raise DataSourceError(f"domain {domain!r} has {len(doc_ids)} documents; need at least "
                              f"{len(SPLITS)} to split into train, gate and eval")
    shuffled = sorted(doc_ids)
    random.Random(f"split/{seed}/{domain}").shuffle(shuffled)
    num_eval = max(1, round(len(shuffled) * eval_fraction))
    num_eval = min(num_eval, len(shuffled) - 2)  # gate and train keep at least one each
    num_gate = max(1, round(len(shuffled) * gate_fraction))
    num_gate = min(num_gate, len(shuffled) - num_eval - 1)  # train keeps at least one
    return {
        "eval": sorted(shuffled[:num_eval]),
        "gate": sorted(shuffled[num_eval:num_eval + num_gate]),
        "train": sorted(shuffled[num_eval + num_gate:]),
    }


def split_pool(domain: DomainData, pool: list[Document]) -> dict[str, list[Document]]:
    """A pool's documents by split, each split in source order."""
    members = split_documents([doc_id for doc_id, _ in pool], seed=domain.seed, domain=domain.name,
                              gate_fraction=domain.gate_fraction, eval_fraction=domain.eval_fraction)
    split_of = {doc_id: split for split, ids in members.items() for doc_id in ids}
    by_split: dict[str, list[Document]] = {split: [] for split in SPLITS}
    for document in pool:
        by_split[split_of[document[0]]].append(document)
    return by_split


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def source_sha256(source: DataSource) -> str:
    """A file's sha256; a folder's: the sha256 of its sorted ``[relative path, file sha256]`` list."""
    if not source.path.is_dir():
        return file_sha256(source.path)
    listing = [[path.relative_to(source.path).as_posix(), file_sha256(path)]
               for path in files_under(source.path)]
    return hashlib.sha256(json.dumps(listing).encode("utf-8")).hexdigest()
