"""Builders for the project tests: tiny expert folders and data files, in milliseconds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gatemix.project import ProjectError

EXPERT_CONFIG = {"architectures": ["LlamaForCausalLM"], "vocab_size": 300, "model_type": "llama"}


def write_expert(folder: Path, *, tokenizer_model: str = "bpe-shared", **config_overrides) -> Path:
    """A folder read_expert accepts: a causal-LM config, a tokenizer, one real safetensors file."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({**EXPERT_CONFIG, **config_overrides}))
    (folder / "tokenizer.json").write_text(json.dumps({"model": {"type": tokenizer_model}}))
    save_file({"w": torch.zeros(1)}, str(folder / "model.safetensors"))
    return folder


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def numbered_docs(count: int, prefix: str = "doc") -> list[dict]:
    return [{"text": f"{prefix} number {index}"} for index in range(count)]


def refused(call, *named) -> str:
    """Run ``call``; it must raise a one-line ProjectError naming every path in ``named``."""
    with pytest.raises(ProjectError) as excinfo:
        call()
    message = str(excinfo.value)
    assert "\n" not in message, message
    for name in named:
        assert str(name) in message, f"{name} not in: {message}"
    return message
