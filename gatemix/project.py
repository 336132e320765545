"""The project file: the experts of one ensemble and the data of each domain.

Every job (fit-gate, distill, pack, serve, bench) reads one project file through
``load_project``, so they all agree on which folder is which expert and which
documents are the gate's and which are held out::

    name = "my-ensemble"        # served model name; default: the project folder's name
    work_dir = "gatemix-work"   # where jobs write: gate/, composite/, student/, cache/
    [experts]                   # expert name = domain name, in composite order
    code = "/models/qwen-code"  # a model folder, or a PEFT LoRA adapter folder
    [base]                      # optional, for adapter experts: path = "<the base model's folder>"
                                # (default: the local base folder the adapters' config names)
    [baselines]                 # optional: models a report compares against, never served
    [data]                      # defaults: text_field, seed, gate_fraction, eval_fraction
    [data.code]                 # train/gate/eval lists, or one pool `files` split with the seed
    [out_of_domain]             # optional: eval = [sources] of text from none of the domains,
                                # read only by reports (how the gate does on what no expert knows)
    [serve]                     # optional: draft = "<folder>" (e.g. the student), num_draft_tokens = 3:
                                # `gatemix serve --project` decodes behind that draft unless --draft is given

Paths are relative to the project file's folder (``~`` expanded, absolute allowed);
``gatemix.data_sources`` says what a source is. YAML holds the same schema;
``gatemix.project_writer`` writes the TOML form.
The tables and the experts are checked on load; documents are read on first
use (data can be large) and kept. Every refusal is a ``ProjectError``: one line
naming the project file, the data file where one is at fault, and the problem.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from gatemix.adapter_folder import AdapterExpert, read_mixture_experts
from gatemix.atomic_write import write_atomically
from gatemix.data_sources import (
    DATA_DEFAULTS,
    POOL,
    SPLITS,
    DataSource,
    DataSourceError,
    Document,
    DomainData,
    TableError,
    check_source,
    expect_type,
    kind_name,
    read_sources,
    reject_unknown_keys,
    resolve_path,
    source_sha256,
    split_pool,
    text_sha256,
)
from gatemix.data_tables import check_settings, parse_domain, parse_out_of_domain
from gatemix.errors import UserError
from gatemix.expert_folder import (
    EXPERT_NAME_PATTERN,
    ExpertFolder,
    ExpertFolderError,
    check_compatible,
)
from gatemix.project_file import ProjectError, find_project_file, read_table

logger = logging.getLogger(__name__)

TOP_LEVEL_KEYS = ("name", "work_dir", "base", "experts", "baselines", "data", "out_of_domain", "serve")
SERVE_KEYS = ("draft", "num_draft_tokens")
OUT_OF_DOMAIN = "out_of_domain"  # the report's name for the [out_of_domain] text
DEFAULT_WORK_DIR = "gatemix-work"
SPLIT_RECORD_FILE = "splits.json"


@dataclass(frozen=True, eq=False)
class Project:
    """A loaded project file; documents are read on first use and kept."""

    path: Path
    name: str
    work_dir: Path
    experts: dict[str, Path]
    baselines: dict[str, Path]
    data: dict[str, DomainData]
    out_of_domain: tuple[DataSource, ...] | None = None  # [out_of_domain] eval sources, if any
    draft: Path | None = None  # [serve] draft: the folder the served ensemble decodes behind
    num_draft_tokens: int | None = None  # [serve] num_draft_tokens: None leaves the server's default
    base: Path | None = None  # [base] path: the base model of adapter experts, if named
    _documents: dict[tuple[str, str], list[Document]] = field(
        default_factory=dict, init=False, repr=False)
    _expert_folders: list[ExpertFolder | AdapterExpert] = field(default_factory=list, init=False, repr=False)

    @property
    def root(self) -> Path:
        return self.path.parent

    @property
    def domains(self) -> list[str]:
        return list(self.experts)

    @property
    def gate_dir(self) -> Path:
        return self.work_dir / "gate"

    @property
    def composite_dir(self) -> Path:
        return self.work_dir / "composite"

    @property
    def student_dir(self) -> Path:
        return self.work_dir / "student"

    @property
    def cache_dir(self) -> Path:
        return self.work_dir / "cache"

    def has_split(self, domain: str, split: str) -> bool:
        domain_data = self._domain(domain)
        if split not in SPLITS:
            raise ProjectError(f"{self.path}: unknown split {split!r} (splits: {', '.join(SPLITS)})")
        return domain_data.is_pool or split in domain_data.sources

    def documents(self, domain: str, split: str) -> list[Document]:
        """The ``(doc_id, text)`` pairs of one domain's split, in source order."""
        if not self.has_split(domain, split):
            raise ProjectError(
                f"{self.path}: domain {domain!r} has no {split} split; add {split} = [\"<file>\"] "
                f"under [data.{domain}], or give one pool {POOL} = [...] split with the seed")
        if (domain, split) not in self._documents:
            try:
                self._load(self.data[domain], split)
            except DataSourceError as exc:
                raise ProjectError(f"{self.path}: {exc}") from exc
        return list(self._documents[(domain, split)])

    def texts(self, domain: str, split: str) -> list[str]:
        return [text for _, text in self.documents(domain, split)]

    def out_of_domain_documents(self) -> list[Document]:
        """The ``[out_of_domain]`` documents (none declared: an empty list), read once."""
        if self.out_of_domain is None:
            return []
        key = (OUT_OF_DOMAIN, "eval")
        if key not in self._documents:
            try:
                self._documents[key] = read_sources(self.out_of_domain, "[out_of_domain] eval")
            except DataSourceError as exc:
                raise ProjectError(f"{self.path}: {exc}") from exc
        return list(self._documents[key])

    def out_of_domain_texts(self) -> list[str]:
        return [text for _, text in self.out_of_domain_documents()]

    def split_listing(self) -> dict[str, dict[str, list[dict]]]:
        """``{domain: {split: [{"id", "sha256"}, ...]}}`` over the splits that exist."""
        return {
            domain: {
                split: [{"id": doc_id, "sha256": text_sha256(text)}
                        for doc_id, text in self.documents(domain, split)]
                for split in SPLITS if self.has_split(domain, split)
            }
            for domain in self.domains
        }

    def source_listing(self) -> dict[str, dict[str, list[dict]]]:
        """``{domain: {split or "files": [{"path", "format", ..., "sha256"}]}}``, hashed now."""
        return {
            domain: {
                key: [{"path": source.label, "format": source.resolved_format(),
                       "text_field": source.text_field, "split": source.split,
                       "sha256": source_sha256(source)} for source in sources]
                for key, sources in domain_data.sources.items()
            }
            for domain, domain_data in self.data.items()
        }

    def write_split_record(self, path: str | os.PathLike | None = None) -> Path:
        """Record which documents each split holds and the hash of every source they came from.

        A job writes it next to what it fitted, so a later run can tell whether
        the data under the project changed. Default: ``<work_dir>/splits.json``.
        """
        target = Path(path) if path is not None else self.work_dir / SPLIT_RECORD_FILE
        splits = self.split_listing()
        try:
            sources = self.source_listing()
        except OSError as exc:  # a source removed since its documents were read
            raise ProjectError(f"{self.path}: cannot hash the sources for {target} ({exc})") from exc
        record = {"project": str(self.path), "name": self.name, "splits": splits,
                  "sources": sources}
        write_atomically(target, json.dumps(record, indent=1, ensure_ascii=False) + "\n")
        return target

    def expert_folders(self) -> list[ExpertFolder | AdapterExpert]:
        """The experts (full folders, or LoRA adapters over the base), read and checked once;
        their weights are not hashed here."""
        if not self._expert_folders:
            try:
                self._expert_folders.extend(read_mixture_experts(self.experts, self.base))
            except UserError as exc:
                raise ProjectError(f"{self.path}: {exc}") from exc
        return list(self._expert_folders)

    @property
    def is_lora(self) -> bool:
        """The experts are LoRA adapters of one base (``[base]``)."""
        return self.expert_folders()[0].is_adapter

    @property
    def tokenizer_dir(self) -> Path:
        """Where the experts' shared tokenizer and the first expert's config.json are (a base's for adapters)."""
        return self.expert_folders()[0].model_dir

    def check_sources(self) -> None:
        """Refuse a declared source that does not exist or cannot be read as its format."""
        for domain_data in self.data.values():
            for key, sources in domain_data.sources.items():
                for source in sources:
                    try:
                        check_source(source)
                    except DataSourceError as exc:
                        raise ProjectError(
                            f"{self.path}: [data.{domain_data.name}] {key}: {exc}") from exc
        for source in self.out_of_domain or ():
            try:
                check_source(source)
            except DataSourceError as exc:
                raise ProjectError(f"{self.path}: [out_of_domain] eval: {exc}") from exc

    def check_baselines(self) -> None:
        """Refuse a baseline folder that does not exist (its contents are the report's concern)."""
        for name, folder in self.baselines.items():
            if not folder.is_dir():
                raise ProjectError(f"{self.path}: baseline {name!r}: folder {folder} does not exist")

    def _domain(self, domain: str) -> DomainData:
        if domain not in self.data:
            raise ProjectError(
                f"{self.path}: no domain {domain!r} (domains: {', '.join(self.domains)})")
        return self.data[domain]

    def _load(self, domain_data: DomainData, split: str) -> None:
        """Read one explicit split, or a whole pool and split it (all three splits at once)."""
        key = POOL if domain_data.is_pool else split
        where = f"[data.{domain_data.name}] {key}"
        documents = read_sources(domain_data.sources[key], where)
        logger.info("domain %s %s: %d documents", domain_data.name, key, len(documents))
        if not domain_data.is_pool:
            self._documents[(domain_data.name, split)] = documents
            return
        try:
            by_split = split_pool(domain_data, documents)
        except DataSourceError as exc:
            raise DataSourceError(f"{where}: {exc}") from exc
        for pool_split, pool_documents in by_split.items():
            self._documents[(domain_data.name, pool_split)] = pool_documents


# ---- reading and checking the file ----

def load_project(path: str | os.PathLike, check_data: bool = True) -> Project:
    """Read and check a project file (``.toml``, ``.yaml``/``.yml``, or a folder holding one).

    Checks the tables, the experts (config, tokenizer, one shared vocabulary; the
    weights are not hashed) and, with ``check_data``, that every source and baseline
    folder exists.
    """
    file = find_project_file(path)
    table = read_table(file)
    try:
        project = _project_from_table(file, table)
    except TableError as exc:
        raise ProjectError(f"{file}: {exc}") from exc
    try:
        check_compatible(project.expert_folders())
    except ExpertFolderError as exc:
        raise ProjectError(f"{file}: {exc}") from exc
    if check_data:
        project.check_sources()
        project.check_baselines()
    return project


def _project_from_table(file: Path, table: dict) -> Project:
    root = file.parent
    reject_unknown_keys(table, TOP_LEVEL_KEYS, "at the top level")
    name = expect_type(table.get("name", root.name), str, "name")
    if not name.strip():
        raise TableError("name must not be empty")
    work_dir = expect_type(table.get("work_dir", DEFAULT_WORK_DIR), str, "work_dir")
    experts = _model_table(table, "experts", root)
    if not experts:
        raise TableError('[experts] is missing or empty; name each expert: <name> = "<folder>"')
    base = _base_table(table.get("base", {}), root)
    data = _data_tables(table.get("data", {}), list(experts), root)
    out_of_domain = None
    if OUT_OF_DOMAIN in table:  # after [data]: its defaults (text_field) are checked by then
        defaults = {**DATA_DEFAULTS, **{key: value for key, value in table.get("data", {}).items()
                                        if key in DATA_DEFAULTS}}
        out_of_domain = parse_out_of_domain(table[OUT_OF_DOMAIN], defaults, root)
    draft, num_draft_tokens = _serve_table(table.get("serve", {}), root)
    return Project(path=file, name=name, work_dir=resolve_path(work_dir, root), experts=experts,
                   baselines=_model_table(table, "baselines", root), data=data,
                   out_of_domain=out_of_domain, draft=draft, num_draft_tokens=num_draft_tokens,
                   base=base)


def _base_table(base: object, root: Path) -> Path | None:
    """``[base]``: ``path`` of the base model the adapter experts are LoRA updates of."""
    base = expect_type(base, dict, "[base]")
    reject_unknown_keys(base, ("path",), "in [base]")
    if "path" not in base:
        return None
    if not expect_type(base["path"], str, "[base] path").strip():
        raise TableError("[base] path must name the base model's folder")
    return resolve_path(base["path"], root)


def _serve_table(serve: object, root: Path) -> tuple[Path | None, int | None]:
    """``[serve]``: the draft folder and the tokens it proposes per step (either may be absent)."""
    serve = expect_type(serve, dict, "[serve]")
    reject_unknown_keys(serve, SERVE_KEYS, "in [serve]")
    draft = serve.get("draft")
    if draft is not None and not expect_type(draft, str, "[serve] draft").strip():
        raise TableError("[serve] draft must name a model folder")
    num_draft_tokens = serve.get("num_draft_tokens")
    if num_draft_tokens is not None:
        expect_type(num_draft_tokens, int, "[serve] num_draft_tokens")
        if not 1 <= num_draft_tokens <= 16:
            raise TableError(f"[serve] num_draft_tokens must be 1 to 16, got {num_draft_tokens}")
        if draft is None:
            raise TableError("[serve] num_draft_tokens needs a draft")
    return (None if draft is None else resolve_path(draft, root)), num_draft_tokens


def _model_table(table: dict, key: str, root: Path) -> dict[str, Path]:
    """``[experts]`` or ``[baselines]``: model name -> folder."""
    models = expect_type(table.get(key, {}), dict, f"[{key}]")
    for name, folder in models.items():
        if not (isinstance(name, str) and EXPERT_NAME_PATTERN.match(name)):
            raise TableError(f"name {name!r} in [{key}] must be lowercase letters, digits, '-' or "
                             "'_', starting with a letter")
        expect_type(folder, str, f"[{key}] {name}")
    return {name: resolve_path(folder, root) for name, folder in models.items()}


def _data_tables(data: object, expert_names: list[str], root: Path) -> dict[str, DomainData]:
    """``[data]``: its defaults, and one ``[data.<expert>]`` per expert, no more, no fewer."""
    data = expect_type(data, dict, "[data]")
    domain_tables = {key: value for key, value in data.items() if isinstance(value, dict)}
    defaults = {key: value for key, value in data.items() if key not in domain_tables}
    for key, value in defaults.items():
        if key in expert_names and key not in DATA_DEFAULTS:
            raise TableError(f"[data.{key}] must be a table, got {kind_name(value)}")
    reject_unknown_keys(defaults, tuple(DATA_DEFAULTS),
                        "in [data] (a domain is a table [data.<expert>])")
    defaults = {**DATA_DEFAULTS, **defaults}
    check_settings(defaults, "[data]")
    for domain in domain_tables:
        if domain not in expert_names:
            raise TableError(f"[data.{domain}] names no expert (experts: {', '.join(expert_names)});"
                             f' add {domain} = "<folder>" under [experts] or remove [data.{domain}]')
    for expert in expert_names:
        if expert not in domain_tables:
            raise TableError(
                f"expert {expert!r} has no data; add [data.{expert}] with train/gate/eval or {POOL}")
    return {name: parse_domain(name, domain_tables[name], defaults, root) for name in expert_names}
