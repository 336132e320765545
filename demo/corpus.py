"""The frozen demo corpus: collect, split at the document level, store, read back.

Layout under the demo folder::

    data/<domain>/<split>.jsonl   one {"id": ..., "text": ...} per line
    data/splits.json              per domain, per split: [{"id", "sha256"}, ...]
    out_of_domain/eval.jsonl      text of no domain (no expert trains on it), for the report
    manifest.json                 the splits, the config, the tokenizer hash,
                                  the models and eval_loss[model][domain]

Later jobs (fit-gate, distill, bench) read the stored texts, never the machine's
files again, so the data a gate was fitted on cannot drift.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from gatemix import data_sources
from gatemix.demo.config import DemoConfig
from gatemix.demo.errors import DemoBuildError
from gatemix.demo.sources import Document, collect_domain

logger = logging.getLogger(__name__)

SPLITS = ("train", "gate", "eval")
DATA_DIR = "data"
SPLITS_FILE = "splits.json"
MANIFEST_FILE = "manifest.json"
OOD_DIR = "out_of_domain"
OOD_FILE = "eval.jsonl"


text_sha256 = data_sources.text_sha256


def split_documents(doc_ids: Sequence[str], *, seed: int, domain: str, gate_fraction: float,
                    eval_fraction: float) -> dict[str, list[str]]:
    """Seeded document-level split into train / gate / eval: the project files' rule.

    The demo is one project among others, so it splits exactly as a user's
    ``files`` pool is split (``gatemix.data_sources.split_documents``).
    """
    try:
        return data_sources.split_documents(doc_ids, seed=seed, domain=domain,
                                            gate_fraction=gate_fraction,
                                            eval_fraction=eval_fraction)
    except data_sources.DataSourceError as error:
        raise DemoBuildError(str(error)) from None


def build_corpus(config: DemoConfig, data_dir: Path) -> dict[str, dict[str, list[dict]]]:
    """Collect every domain, split it and store it under ``data_dir``.

    Returns the split listing that also goes to ``splits.json``:
    ``{domain: {split: [{"id", "sha256"}, ...]}}``.
    """
    listing: dict[str, dict[str, list[dict]]] = {}
    for domain in config.domains:
        documents = collect_domain(domain, config)
        if not documents:
            raise DemoBuildError(f"no documents found for domain {domain!r} on this machine")
        splits = split_documents([doc_id for doc_id, _ in documents], seed=config.seed,
                                 domain=domain, gate_fraction=config.gate_fraction,
                                 eval_fraction=config.eval_fraction)
        listing[domain] = write_domain(data_dir / domain, documents, splits)
        logger.info("domain %s: %s", domain,
                    ", ".join(f"{split} {len(ids)} docs" for split, ids in splits.items()))
    (data_dir / SPLITS_FILE).write_text(json.dumps(listing, indent=1), encoding="utf-8")
    return listing


def write_domain(domain_dir: Path, documents: list[Document],
                 splits: dict[str, list[str]]) -> dict[str, list[dict]]:
    """Write one jsonl file per split; return each split's ids and text hashes."""
    domain_dir.mkdir(parents=True, exist_ok=True)
    text_by_id = dict(documents)
    listing: dict[str, list[dict]] = {}
    for split in SPLITS:
        lines = [json.dumps({"id": doc_id, "text": text_by_id[doc_id]}, ensure_ascii=False)
                 for doc_id in splits[split]]
        (domain_dir / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        listing[split] = [{"id": doc_id, "sha256": text_sha256(text_by_id[doc_id])}
                          for doc_id in splits[split]]
    return listing


def write_out_of_domain(folder: Path, documents: list[Document]) -> list[dict]:
    """The out-of-domain documents as one jsonl file; returns their ids and text hashes."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"id": doc_id, "text": text}, ensure_ascii=False)
             for doc_id, text in documents]
    (folder / OOD_FILE).write_text("\n".join(lines) + "\n" if lines else "", encoding="utf-8")
    return [{"id": doc_id, "sha256": text_sha256(text)} for doc_id, text in documents]


def load_split_documents(demo_dir: str | Path, domain: str, split: str) -> list[Document]:
    """The stored ``(doc_id, text)`` pairs of one domain's split, in stored order."""
    if split not in SPLITS:
        raise DemoBuildError(f"unknown split {split!r}; known: {SPLITS}")
    path = Path(demo_dir) / DATA_DIR / domain / f"{split}.jsonl"
    if not path.is_file():
        raise DemoBuildError(f"no stored split {domain}/{split} under {demo_dir}")
    documents: list[Document] = []
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                documents.append((record["id"], record["text"]))
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise DemoBuildError(f"corrupt line {line_number} in {path}: {error}") from None
    return documents


def load_split(demo_dir: str | Path, domain: str, split: str) -> list[str]:
    """The stored texts of one domain's split (``"train"``, ``"gate"`` or ``"eval"``)."""
    return [text for _, text in load_split_documents(demo_dir, domain, split)]


def load_manifest(demo_dir: str | Path) -> dict:
    """The demo's ``manifest.json``: splits, config, tokenizer hash, models, eval_loss."""
    path = Path(demo_dir) / MANIFEST_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DemoBuildError(f"no demo manifest at {path}; build the demo first") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DemoBuildError(f"unreadable demo manifest {path}: {error}") from None
