"""Reading and checking the expert folders that go into one mixture.

An expert is an ordinary Hugging Face causal-LM folder (``config.json``,
``*.safetensors``, a fast tokenizer). Experts can share one mixture only if they
share one vocabulary: the same tokenizer (vocabulary, merges, normalizer and
special tokens) and the same ``vocab_size``. Their architectures and sizes may
differ; what the engine can run side by side is checked where the composite is
packed. Everything is refused here, before anything is written, with one line
that names the folder and the problem.

Nothing here imports vLLM: the offline jobs read expert folders on machines
without it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from safetensors import safe_open

from gatemix.atomic_write import write_atomically
from gatemix.errors import UserError

EXPERT_NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


class ExpertFolderError(UserError):
    """An expert folder that cannot go into a composite; the message is one line."""


@dataclass(frozen=True)
class ExpertFolder:
    name: str
    path: Path
    config: dict
    tokenizer_fingerprint: str
    is_adapter: ClassVar[bool] = False  # ``adapter_folder.AdapterExpert`` is the other kind

    @property
    def model_dir(self) -> Path:
        """The folder holding the model's config.json and tokenizer: the expert's own."""
        return self.path

    @property
    def architecture(self) -> str:
        return self.config["architectures"][0]

    @property
    def weight_files(self) -> list[Path]:
        return sorted(self.path.glob("*.safetensors"))

    @functools.cached_property
    def weights_hash(self) -> str:
        """Computed on first use: hashing reads every weight file (gigabytes for real experts)."""
        return expert_hash(self.path)


def _file_sha256(path: Path, digest) -> None:
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)


def expert_hash(folder: str | Path) -> str:
    """sha256 over an expert's config.json and *.safetensors, in name order.

    Real experts hold gigabytes, and every pack and every server start checks
    the hash, so it is remembered per folder (``hash_memo_path``) under the
    files' names, sizes and modification times: a changed file is hashed again.
    """
    folder = Path(folder).resolve()
    files = [folder / "config.json", *sorted(folder.glob("*.safetensors"))]
    stamp = [[path.name, path.stat().st_size, path.stat().st_mtime_ns] for path in files]
    memo = _read_hash_memo()
    entry = memo.get(str(folder))
    if entry and entry.get("stamp") == stamp:
        return entry["sha256"]
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        _file_sha256(path, digest)
    memo[str(folder)] = {"stamp": stamp, "sha256": digest.hexdigest()}
    _write_hash_memo(memo)
    return digest.hexdigest()


def hash_memo_path() -> Path:
    """``$GATEMIX_CACHE_DIR/expert-hashes.json``, default ``~/.cache/gatemix``."""
    root = os.environ.get("GATEMIX_CACHE_DIR") or Path.home() / ".cache" / "gatemix"
    return Path(root) / "expert-hashes.json"


def _read_hash_memo() -> dict:
    try:
        memo = json.loads(hash_memo_path().read_text())
        return memo if isinstance(memo, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_hash_memo(memo: dict) -> None:
    """Best effort, atomic: a read-only home or a lost race only costs a second hashing."""
    try:
        write_atomically(hash_memo_path(), json.dumps(memo))
    except OSError:
        pass


def tokenizer_fingerprint(folder: Path) -> str:
    """A hash of what decides token ids: the vocabulary, merges, normalizer and special tokens."""
    tokenizer_path = folder / "tokenizer.json"
    if not tokenizer_path.is_file():
        raise ExpertFolderError(f"{folder}: no tokenizer.json (only fast tokenizers are supported)")
    try:
        tokenizer = json.loads(tokenizer_path.read_text())
        tok_config = json.loads((folder / "tokenizer_config.json").read_text()) if (
            folder / "tokenizer_config.json"
        ).is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ExpertFolderError(f"{folder}: corrupt tokenizer files ({exc})") from exc
    decisive = {
        key: tokenizer.get(key)
        for key in ("model", "normalizer", "pre_tokenizer", "added_tokens", "post_processor")
    }
    decisive["special"] = {
        key: tok_config.get(key) for key in ("bos_token", "eos_token", "pad_token", "unk_token")
    }
    return hashlib.sha256(json.dumps(decisive, sort_keys=True).encode()).hexdigest()


def is_causal_lm_architecture(architecture: str) -> bool:
    """A ``*ForCausalLM`` class, or one transformers lists as a causal LM (``GPT2LMHeadModel``)."""
    if architecture.endswith("ForCausalLM"):
        return True
    # transformers: deferred (seconds to import), and only for the rare non-*ForCausalLM name
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return architecture in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def check_expert_name(name: str, error: type[UserError]) -> None:
    """An expert's name becomes a served model name, a metric label and a folder: keep it plain."""
    if not EXPERT_NAME_PATTERN.match(name):
        raise error(f"expert name {name!r} must be lowercase letters, digits, '-' or '_', starting with a letter")


def read_config_json(folder: Path, file_name: str, kind: str, error: type[UserError]) -> dict:
    """A folder's JSON config, or a one-line ``error``: missing (not a ``kind``) or corrupt."""
    config_path = folder / file_name
    if not config_path.is_file():
        raise error(f"{folder}: no {file_name}, not a {kind}")
    try:
        return json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{folder}: corrupt {file_name} ({exc})") from exc


def read_expert(path: str | Path, name: str | None = None) -> ExpertFolder:
    """Check one expert folder and read what the composite needs from it."""
    path = Path(path)
    name = name or path.name
    check_expert_name(name, ExpertFolderError)
    if not path.is_dir():
        raise ExpertFolderError(f"expert folder {path} does not exist")
    config = read_config_json(path, "config.json", "Hugging Face model folder", ExpertFolderError)
    architectures = config.get("architectures") or []
    if len(architectures) != 1 or not is_causal_lm_architecture(str(architectures[0])):
        raise ExpertFolderError(
            f"{path}: not a causal language model (config.json architectures {architectures}; "
            "an expert is one causal-LM class, such as LlamaForCausalLM)"
        )
    if not isinstance(config.get("vocab_size"), int):
        raise ExpertFolderError(f"{path}: config.json has no integer vocab_size")
    if not list(path.glob("*.safetensors")):
        raise ExpertFolderError(f"{path}: no *.safetensors weights")
    _check_safetensors(path)
    return ExpertFolder(
        name=name,
        path=path,
        config=config,
        tokenizer_fingerprint=tokenizer_fingerprint(path),
    )


def _check_safetensors(path: Path) -> None:
    for weights in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(weights), framework="pt") as handle:
                handle.keys()
        except Exception as exc:  # safetensors raises several types for corrupt files
            raise ExpertFolderError(f"{weights}: corrupt safetensors file ({exc})") from exc


def check_shared_vocabulary(experts: list[ExpertFolder]) -> None:
    """Refuse experts whose next-token distributions are not over one vocabulary."""
    first = experts[0]
    for other in experts[1:]:
        if other.tokenizer_fingerprint != first.tokenizer_fingerprint:
            raise ExpertFolderError(
                f"experts {first.name!r} ({first.path}) and {other.name!r} ({other.path}) have "
                "different tokenizers; a mixture needs one shared vocabulary"
            )
        if other.config["vocab_size"] != first.config["vocab_size"]:
            raise ExpertFolderError(
                f"experts {first.name!r} and {other.name!r} have vocab_size "
                f"{first.config['vocab_size']} and {other.config['vocab_size']}; "
                "a mixture needs one shared vocabulary"
            )


def check_compatible(experts: list[ExpertFolder]) -> None:
    """Refuse a set of experts that cannot share one mixture: none, duplicate names, two vocabularies."""
    if len(experts) < 1:
        raise ExpertFolderError("a mixture needs at least one expert")
    names = [expert.name for expert in experts]
    if len(set(names)) != len(names):
        raise ExpertFolderError(f"expert names must be unique, got {names}")
    check_shared_vocabulary(experts)
