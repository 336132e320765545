"""Reading and checking PEFT LoRA adapter folders: experts that are low-rank updates of one base.

An adapter expert is the folder ``peft`` saves (``adapter_config.json`` and
``adapter_model.safetensors``). Expert k's projection ``W`` of the base becomes
``x W^T + s_k (x A_k^T) B_k^T``, with ``A_k`` of shape ``(r, in)``, ``B_k`` of
shape ``(out, r)`` and ``s_k = lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA).

Only plain LoRA on the Llama family's seven decoder projections is read
(``ADAPTER_MODULES``); everything else an adapter may carry (DoRA, trained
biases, saved whole modules, per-module ranks) is refused in one line, as is an
adapter whose base is not the given one: by the weights' hash when the adapter
names a local base folder, else by every factor's shape against the base's.

Nothing here imports vLLM: the offline jobs read adapter folders on machines
without it.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from safetensors import safe_open

from gatemix.errors import UserError
from gatemix.expert_folder import (
    ExpertFolder,
    ExpertFolderError,
    check_expert_name,
    expert_hash,
    read_config_json,
    read_expert,
)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# The architectures whose decoder layers the LoRA composite knows (same module names and stacking).
LORA_BASE_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
# Hugging Face module name -> its path inside a decoder layer.
ADAPTER_MODULES = {
    "q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
    "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
    "down_proj": "mlp.down_proj",
}
# adapter_config.json fields that change what the adapter computes beyond x W + s (x A) B.
UNSUPPORTED_OPTIONS = (
    "use_dora", "modules_to_save", "lora_bias", "rank_pattern", "alpha_pattern", "fan_in_fan_out",
    "layer_replication", "target_parameters", "trainable_token_indices", "use_qalora", "use_bdlora",
    "alora_invocation_tokens",
)
_FACTOR_NAME = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


class AdapterFolderError(UserError):
    """An adapter folder that cannot be an expert of this base; the message is one line."""


@dataclass(frozen=True)
class LoRAFactor:
    """One adapted projection of one layer: ``delta(x) = scale * (x @ a.T) @ b.T``."""

    a: torch.Tensor  # (r, in)
    b: torch.Tensor  # (out, r)
    scale: float


@dataclass(frozen=True)
class AdapterFolder:
    name: str
    path: Path
    config: dict

    @property
    def weights_path(self) -> Path:
        return self.path / ADAPTER_WEIGHTS

    @property
    def base_reference(self) -> str | None:
        """The base the adapter was trained on, as its config names it (a hub id or a local path)."""
        return self.config.get("base_model_name_or_path")

    @property
    def scale(self) -> float:
        rank, alpha = int(self.config["r"]), float(self.config.get("lora_alpha", self.config["r"]))
        return alpha / math.sqrt(rank) if self.config.get("use_rslora") else alpha / rank

    def factor_shapes(self) -> dict[tuple[int, str], tuple[list[int], list[int]]]:
        """``(layer, module) -> (shape of A, shape of B)``, read from the file's header only."""
        shapes: dict[tuple[int, str], dict[str, list[int]]] = {}
        with safe_open(str(self.weights_path), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
                match = _FACTOR_NAME.match(key)
                module = match and match.group(3)
                if not match or ADAPTER_MODULES.get(module) != f"{match.group(2)}.{module}":
                    raise AdapterFolderError(
                        f"{self.path}: adapter weight {key} is not LoRA on one of {list(ADAPTER_MODULES)}; "
                        "LoRA experts adapt only the decoder layers' projections"
                    )
                shapes.setdefault((int(match.group(1)), module), {})[match.group(4)] = handle.get_slice(key).get_shape()
        incomplete = [key for key, pair in shapes.items() if set(pair) != {"A", "B"}]
        if incomplete:
            raise AdapterFolderError(f"{self.path}: LoRA factors without their pair at {sorted(incomplete)[:3]}")
        return {key: (pair["A"], pair["B"]) for key, pair in shapes.items()}

    def factors(self) -> dict[tuple[int, str], LoRAFactor]:
        """``(layer, Hugging Face module name) -> LoRAFactor``, in the file's dtype."""
        factors = {}
        with safe_open(str(self.weights_path), framework="pt") as handle:
            for layer, module in self.factor_shapes():
                stem = f"base_model.model.model.layers.{layer}.{ADAPTER_MODULES[module]}"
                factors[(layer, module)] = LoRAFactor(
                    a=handle.get_tensor(f"{stem}.lora_A.weight"),
                    b=handle.get_tensor(f"{stem}.lora_B.weight"),
                    scale=self.scale,
                )
        return factors

    def weights_hash(self, base_hash: str) -> str:
        """sha256 over the base's hash, the adapter's config and its factors: the expert's identity."""
        digest = hashlib.sha256(base_hash.encode())
        for path in (self.path / ADAPTER_CONFIG, self.weights_path):
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
        return digest.hexdigest()


def _is_set(value) -> bool:
    return value not in (None, False, {}, [], "", "none")


def read_adapter(path: str | Path, name: str | None = None) -> AdapterFolder:
    """Check one PEFT adapter folder (LoRA, safetensors, no option gatemix cannot apply)."""
    path = Path(path)
    name = name or path.name
    check_expert_name(name, AdapterFolderError)
    config = read_config_json(path, ADAPTER_CONFIG, "PEFT adapter folder", AdapterFolderError)
    if config.get("peft_type") != "LORA":
        raise AdapterFolderError(
            f"{path}: adapter type {config.get('peft_type')!r}; only LoRA adapters can be experts"
        )
    options = [option for option in UNSUPPORTED_OPTIONS if _is_set(config.get(option))]
    if _is_set(config.get("bias")):
        options.append("bias")
    if options:
        raise AdapterFolderError(f"{path}: LoRA options {options} are not supported; plain LoRA only")
    if not (path / ADAPTER_WEIGHTS).is_file():
        raise AdapterFolderError(f"{path}: no {ADAPTER_WEIGHTS} (only safetensors adapters are read)")
    return AdapterFolder(name=name, path=path, config=config)


def base_projection_shapes(base: ExpertFolder) -> dict[str, list[int]]:
    """Hugging Face weight name -> shape, for every tensor of the base (from the files' headers)."""
    shapes = {}
    for weights in base.weight_files:
        with safe_open(str(weights), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118
                shapes[key] = handle.get_slice(key).get_shape()
    return shapes


def check_adapter_fits_base(adapter: AdapterFolder, base: ExpertFolder) -> None:
    """Refuse an adapter that was not trained on ``base`` or adapts what the base does not have."""
    if base.architecture not in LORA_BASE_ARCHITECTURES:
        raise AdapterFolderError(
            f"{base.path}: base architecture {base.architecture}; LoRA experts run over "
            f"{', '.join(LORA_BASE_ARCHITECTURES)}"
        )
    targets = adapter.config.get("target_modules")
    if isinstance(targets, list):
        lacking = sorted(set(targets) - set(ADAPTER_MODULES))
        if lacking:
            raise AdapterFolderError(
                f"{adapter.path}: target modules {lacking} are not among {base.architecture}'s "
                f"adaptable projections {list(ADAPTER_MODULES)}"
            )
    reference = adapter.base_reference
    if reference and Path(reference).is_dir() and expert_hash(reference) != base.weights_hash:
        raise AdapterFolderError(
            f"{adapter.path}: trained on base {reference}, whose weights differ from the base {base.path}"
        )
    base_shapes = base_projection_shapes(base)
    for (layer, module), (a_shape, b_shape) in sorted(adapter.factor_shapes().items()):
        weight = f"model.layers.{layer}.{ADAPTER_MODULES[module]}.weight"
        if weight not in base_shapes:
            raise AdapterFolderError(f"{adapter.path}: adapts {weight}, which the base {base.path} does not have")
        out_features, in_features = base_shapes[weight]
        if a_shape[1] != in_features or b_shape[0] != out_features or a_shape[0] != b_shape[1]:
            raise AdapterFolderError(
                f"{adapter.path}: factors of {weight} have shapes {a_shape} and {b_shape}, the base's "
                f"weight is {[out_features, in_features]}: the adapter is of another base"
            )


@dataclass(frozen=True)
class AdapterExpert:
    """A LoRA adapter as every job sees an expert: an ``ExpertFolder``'s fields, read from its base.

    Its config and tokenizer are the base's (an adapter changes neither the
    widths nor the vocabulary); its identity is the base's weights and its own.
    """

    name: str
    adapter: AdapterFolder
    base: ExpertFolder
    is_adapter: ClassVar[bool] = True

    @property
    def path(self) -> Path:
        return self.adapter.path

    @property
    def model_dir(self) -> Path:
        """The folder holding the model's config.json and tokenizer: the base's."""
        return self.base.path

    @property
    def config(self) -> dict:
        return self.base.config

    @property
    def tokenizer_fingerprint(self) -> str:
        return self.base.tokenizer_fingerprint

    @property
    def architecture(self) -> str:
        return self.base.architecture

    @functools.cached_property
    def weights_hash(self) -> str:
        return self.adapter.weights_hash(self.base.weights_hash)


def is_adapter_folder(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def resolve_base(base: str | Path | None, adapter_paths: list[Path]) -> Path:
    """The base folder: as given, else the local folder the first adapter's config names."""
    if base is None:
        reference = read_adapter(adapter_paths[0], "adapter").base_reference if adapter_paths else None
        if not reference or not Path(reference).is_dir():
            raise AdapterFolderError(
                f"no base model given, and the adapter names base {reference!r}, not a local folder")
        base = reference
    if not Path(base).is_dir():
        raise AdapterFolderError(f"base model folder {base} does not exist")
    return Path(base)


def read_adapter_experts(base: str | Path | None, adapters: dict[str, Path]) -> list[AdapterExpert]:
    """Adapter experts by name, each checked against the one base (given, or the adapters' own)."""
    if not adapters:
        raise AdapterFolderError("a LoRA composite needs at least one adapter")
    base_path = resolve_base(base, list(adapters.values()))
    try:
        base_folder = read_expert(base_path, "base")
    except ExpertFolderError as exc:
        raise AdapterFolderError(f"base model: {exc}") from exc
    experts = []
    for name, path in adapters.items():
        adapter = _read_named(read_adapter, path, name)
        check_adapter_fits_base(adapter, base_folder)
        experts.append(AdapterExpert(name, adapter, base_folder))
    return experts


def read_mixture_experts(experts: dict[str, Path], base: Path | None) -> list[ExpertFolder | AdapterExpert]:
    """A mixture's experts by name: all full model folders, or all LoRA adapters of one base.

    Both kinds in one mixture are refused: a LoRA composite runs one base for
    every expert, and a full expert has no place in it.
    """
    adapters = [name for name, path in experts.items() if is_adapter_folder(path)]
    if adapters and len(adapters) < len(experts):
        full = [name for name in experts if name not in adapters]
        raise AdapterFolderError(
            f"experts {full} are full models and {adapters} LoRA adapters; a mixture holds full models "
            "or adapters of one base, not both (merge the adapters, or make every expert an adapter)")
    if adapters:
        return list(read_adapter_experts(base, experts))
    if base is not None:
        raise AdapterFolderError(f"a base model ({base}) is given, but no expert is a LoRA adapter folder")
    return [_read_named(read_expert, path, name) for name, path in experts.items()]


def _read_named(read, path: Path, name: str):
    """``read(path, name)``, its refusal naming the expert."""
    try:
        return read(path, name)
    except UserError as exc:
        raise type(exc)(f"expert {name!r}: {exc}") from exc
