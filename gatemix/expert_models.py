"""The experts as ``transformers`` models, for the offline jobs (fit-gate, distill and their reports).

An expert is given as its folder (a full causal-LM folder), or as what a
project reads (``ExpertFolder``, ``AdapterExpert``). LoRA adapter experts of
one base are loaded the way the engine holds them: the base once, ``peft``
holding every adapter over it, and each expert a view that makes its own
adapter the active one before it runs. K adapters then cost one base's memory
offline too, where merging each would hold K full copies.

Nothing here imports vLLM; ``transformers`` and ``peft`` are imported when a
model loads (seconds), not with the module.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from gatemix.adapter_folder import (
    AdapterExpert,
    AdapterFolderError,
    is_adapter_folder,
    read_adapter_experts,
)
from gatemix.expert_folder import ExpertFolder, expert_hash

Expert = ExpertFolder | AdapterExpert | str | Path


class AdapterView:
    """One adapter expert of a ``PeftModel`` that holds several: called like the causal LM it is."""

    def __init__(self, model, adapter_name: str) -> None:
        self.model = model  # the PeftModel shared by every view of its base
        self.adapter_name = adapter_name

    @property
    def config(self):
        return self.model.get_base_model().config

    def __call__(self, *args, **kwargs):
        self.model.set_adapter(self.adapter_name)
        return self.model(*args, **kwargs)


def model_dir(expert: Expert) -> Path:
    """The folder holding the expert's config.json and tokenizer (the base's, for an adapter)."""
    return Path(expert) if isinstance(expert, (str, Path)) else expert.model_dir


def weights_hash(expert: Expert) -> str:
    """The expert's identity, as gate artifacts and composites record it."""
    return expert_hash(expert) if isinstance(expert, (str, Path)) else expert.weights_hash


def as_experts(experts: Sequence[Expert], base: str | Path | None = None) -> list[ExpertFolder | AdapterExpert | Path]:
    """Folder paths stay paths, except adapter folders, read over ``base`` (None: the one their config names)."""
    items: list = []
    for expert in experts:
        if isinstance(expert, (str, Path)) and is_adapter_folder(expert):
            items += read_adapter_experts(base, {Path(expert).name: Path(expert)})
        else:
            items.append(Path(expert) if isinstance(expert, str) else expert)
    return items


def load_expert_models(experts: Sequence[Expert], *, base: str | Path | None = None,
                       device: str | torch.device = "cpu", dtype: torch.dtype | str = torch.float32) -> list:
    """One callable causal LM per expert, in order, in eval mode with no gradients, on ``device``
    (adapter folders given as paths are read over ``base``, None: the base their config names)."""
    from transformers import AutoModelForCausalLM

    items = as_experts(experts, base)
    adapters = [item for item in items if isinstance(item, AdapterExpert)]
    if adapters and len(adapters) < len(items):
        raise AdapterFolderError("full experts and LoRA adapters cannot be loaded as one mixture")
    if adapters:
        return _load_adapters(adapters, device, dtype)
    return [AutoModelForCausalLM.from_pretrained(model_dir(item), dtype=dtype).to(device).eval()
            .requires_grad_(False) for item in items]


def _load_adapters(adapters: list[AdapterExpert], device, dtype: torch.dtype | str) -> list[AdapterView]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    bases = {adapter.base.path.resolve() for adapter in adapters}
    if len(bases) != 1:
        raise AdapterFolderError(f"LoRA experts of one mixture need one base, got {sorted(map(str, bases))}")
    base = AutoModelForCausalLM.from_pretrained(adapters[0].base.path, dtype=dtype)
    model = PeftModel.from_pretrained(base, adapters[0].path, adapter_name=adapters[0].name)
    for adapter in adapters[1:]:
        model.load_adapter(adapter.path, adapter_name=adapter.name)
    model = model.to(device).eval().requires_grad_(False)
    return [AdapterView(model, adapter.name) for adapter in adapters]
