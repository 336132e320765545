"""The composite model folder: K experts and their gate under one architecture.

Layout (every file an ordinary Hugging Face / vLLM file, so vLLM loads it
with no special loader)::

    config.json                     the first expert's config, architectures =
                                    ["GatemixForCausalLM"], plus a "gatemix" block
    expert_configs/<key>/config.json     expert k's own config.json, unchanged: the
                                    engine builds expert k from vLLM's class for it
    experts-0000k-of-0000K.safetensors   expert k's tensors, named "experts.{k}.<hf name>"
    model.safetensors.index.json
    gate/router.json, gate/router.safetensors   the router artifact (gatemix.gate.artifact)
    tokenizer files, generation_config.json     copied from the first expert

The experts may differ in architecture and size; they share one vocabulary.

A composite of LoRA experts (``gatemix.engine.lora_pack``, architecture
``GatemixLoRAForCausalLM``) holds one base instead: the base's own
``*.safetensors`` (names unchanged) at the top, ``base/config.json``, and
``adapters/<key>/`` with each expert's ``adapter_config.json`` and
``adapter_model.safetensors``; its ``gatemix`` block adds ``"lora"``.

This module is the format and its reading only (what the engine's model needs);
writing a composite from expert folders or a project is ``gatemix.engine.pack``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from gatemix.errors import UserError

COMPOSITE_FORMAT = "gatemix-composite/2"  # 2: experts of any architecture and size
COMPOSITE_ARCHITECTURE = "GatemixForCausalLM"
LORA_COMPOSITE_ARCHITECTURE = "GatemixLoRAForCausalLM"  # K LoRA adapters of one base
BASE_SUBDIR = "base"
ADAPTERS_SUBDIR = "adapters"
LORA_PARALLEL_REFUSAL = (
    "a composite of LoRA experts runs on one GPU for now (tensor and pipeline parallel size 1): "
    "its experts' low-rank factors are not sharded yet"
)
GATE_SUBDIR = "gate"
EXPERT_CONFIGS_SUBDIR = "expert_configs"
# The composite's own key in vLLM's ``additional_config`` (the engine settings' way into
# the model's ``__init__`` in every worker): compile the mixing step.
COMPILE_MIXING_KEY = "gatemix_compile_mixing"


class PackError(UserError):
    """Packing refused; the message is one line and nothing was written."""


def expert_module_key(index: int) -> str:
    """Expert ``index``'s module name in the engine: ``a``, ..., ``z``, ``aa``, ... (no digit).

    vLLM reads the one integer in each attention layer's name as its layer
    index, so the expert's own prefix must hold none.
    """
    key = ""
    index += 1
    while index:
        index, remainder = divmod(index - 1, 26)
        key = chr(ord("a") + remainder) + key
    return key


def expert_config_dir(model_dir: str | Path, index: int) -> Path:
    """The folder holding expert ``index``'s own ``config.json`` inside a composite."""
    return Path(model_dir) / EXPERT_CONFIGS_SUBDIR / expert_module_key(index)


def adapter_dir(model_dir: str | Path, index: int) -> Path:
    """The folder holding LoRA expert ``index``'s adapter files inside a LoRA composite."""
    return Path(model_dir) / ADAPTERS_SUBDIR / expert_module_key(index)


def is_composite_architecture(architectures: list[str]) -> bool:
    """A config's ``architectures`` name a gatemix composite (of full experts or of LoRA experts)."""
    return COMPOSITE_ARCHITECTURE in architectures or LORA_COMPOSITE_ARCHITECTURE in architectures


def is_lora_composite_folder(path: str | Path) -> bool:
    """A composite of LoRA experts of one base (``gatemix.engine.lora_pack``)."""
    config = json.loads((Path(path) / "config.json").read_text())
    return LORA_COMPOSITE_ARCHITECTURE in (config.get("architectures") or [])


def is_composite_folder(path: str | Path) -> bool:
    """A folder written by ``gatemix pack`` (else a plain model folder); its config.json must exist."""
    return "gatemix" in json.loads((Path(path) / "config.json").read_text())


@dataclass(frozen=True)
class CompositeInfo:
    """What the server and the engine need to know about a composite folder."""

    path: Path
    expert_names: list[str]
    expert_hashes: dict[str, str]
    gate_version: str
    gate_method: str
    gate_created_at: float

    @classmethod
    def read(cls, path: str | Path) -> CompositeInfo:
        path = Path(path)
        try:
            config = json.loads((path / "config.json").read_text())
            block = config["gatemix"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise PackError(f"{path} is not a gatemix composite folder ({exc})") from exc
        if block.get("format") != COMPOSITE_FORMAT:
            raise PackError(
                f"{path} was packed in format {block.get('format')!r}, this gatemix reads "
                f"{COMPOSITE_FORMAT!r}: pack it again with `gatemix pack`"
            )
        gate = json.loads((path / GATE_SUBDIR / "router.json").read_text())
        return cls(
            path=path,
            expert_names=list(block["expert_names"]),
            expert_hashes=dict(block["expert_hashes"]),
            gate_version=gate["version"],
            gate_method=gate["method"],
            gate_created_at=float(gate.get("created_at", 0.0)),
        )
