"""Packing LoRA experts: one base model folder and K PEFT LoRA adapter folders into one composite.

Every check runs before anything is written: the base exists, vLLM builds its
architecture and the LoRA composite knows it (the Llama family); each adapter
is plain LoRA on the base's decoder projections and was trained on this base
(``gatemix.adapter_folder``); the gate fits. The folder (layout in
``gatemix.engine.composite_folder``) holds the base's weights once, hard-linked
where the filesystem allows (a base of gigabytes is not copied), and each
adapter's own two files.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from gatemix.adapter_folder import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    AdapterExpert,
    read_adapter_experts,
)
from gatemix.engine.composite_folder import (
    BASE_SUBDIR,
    COMPOSITE_FORMAT,
    GATE_SUBDIR,
    LORA_COMPOSITE_ARCHITECTURE,
    CompositeInfo,
    PackError,
    adapter_dir,
)
from gatemix.engine.pack import COPIED_FILES, check_vllm_supports, write_composite_folder
from gatemix.errors import UserError
from gatemix.gate.artifact import RouterArtifact, save_router

logger = logging.getLogger(__name__)

BASE_INDEX_FILE = "model.safetensors.index.json"


def read_lora_experts(
    base: str | Path | None, adapter_paths: list[str | Path], names: list[str] | None
) -> list[AdapterExpert]:
    """The adapters over their base, every refusal raised as a one-line ``PackError``."""
    if names is not None and len(names) != len(adapter_paths):
        raise PackError(f"{len(names)} names for {len(adapter_paths)} adapters")
    names = names or [Path(path).name for path in adapter_paths]
    if len(set(names)) != len(names):
        raise PackError(f"expert names must be unique, got {names}")
    try:
        experts = read_adapter_experts(base, {name: Path(path) for name, path in zip(names, adapter_paths)})
        check_vllm_supports([experts[0].base])
    except UserError as exc:
        raise PackError(str(exc)) from exc
    return experts


def pack_lora_composite(
    base: str | Path | None,
    adapter_paths: list[str | Path],
    out_dir: str | Path,
    gate: str | RouterArtifact | None = None,
    names: list[str] | None = None,
    overwrite: bool = False,
) -> CompositeInfo:
    """Write one composite of LoRA experts of ``base``; all checks run before any write."""
    out_dir = Path(out_dir)
    experts = read_lora_experts(base, adapter_paths, names)
    artifact = write_composite_folder(experts, gate, out_dir, overwrite, _write_lora_composite)
    logger.info("packed %d LoRA experts of %s into %s (gate %s)", len(experts), experts[0].base.path, out_dir,
                artifact.version)
    return CompositeInfo.read(out_dir)


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # another filesystem, or one without hard links
        shutil.copy2(source, target)


def _write_lora_composite(experts: list[AdapterExpert], artifact: RouterArtifact, staging: Path) -> None:
    base = experts[0].base
    for weights in base.weight_files:
        _link_or_copy(weights, staging / weights.name)
    if (base.path / BASE_INDEX_FILE).is_file():
        shutil.copy2(base.path / BASE_INDEX_FILE, staging / BASE_INDEX_FILE)
    (staging / BASE_SUBDIR).mkdir()
    shutil.copy2(base.path / "config.json", staging / BASE_SUBDIR / "config.json")
    for index, expert in enumerate(experts):
        folder = adapter_dir(staging, index)
        folder.mkdir(parents=True)
        shutil.copy2(expert.adapter.path / ADAPTER_CONFIG, folder / ADAPTER_CONFIG)
        _link_or_copy(expert.adapter.weights_path, folder / ADAPTER_WEIGHTS)
    save_router(artifact, staging / GATE_SUBDIR)
    (staging / "config.json").write_text(json.dumps(lora_composite_config(experts, artifact), indent=2))
    for name in COPIED_FILES:
        if (base.path / name).is_file():
            shutil.copy2(base.path / name, staging / name)


def lora_composite_config(experts: list[AdapterExpert], artifact: RouterArtifact) -> dict:
    """The composite's config.json: the base's, as vLLM reads it, plus the gatemix block."""
    base = experts[0].base
    config = dict(base.config)
    config["architectures"] = [LORA_COMPOSITE_ARCHITECTURE]
    config["gatemix"] = {
        "format": COMPOSITE_FORMAT,
        "expert_names": [expert.name for expert in experts],
        "expert_hashes": {expert.name: expert.weights_hash for expert in experts},
        "expert_architectures": [base.architecture] * len(experts),
        "expert_hidden_sizes": [base.config["hidden_size"]] * len(experts),
        "gate_version": artifact.version,
        "lora": {"base_architecture": base.architecture, "base_hash": base.weights_hash},
    }
    return config
