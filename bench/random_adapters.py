"""Randomly initialised PEFT LoRA adapters of a base folder, as ``peft`` saves them.

The tests (and, later, the LoRA benchmark) need adapters nobody trained. ``peft``
starts ``B`` at zero, which would make every adapter the base itself; here both
factors are random (``init_lora_weights=False``) and ``B`` is redrawn with a
chosen spread, so each adapter moves the next-token distributions well away from
the base's.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

# peft and transformers are imported inside the writer: they cost seconds, and peft is a test extra.

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL_LINEAR_MODULES = (*ATTENTION_MODULES, "gate_proj", "up_proj", "down_proj")


def write_random_lora_adapter(
    out_dir: str | Path,
    base_dir: str | Path,
    target_modules: Sequence[str] = ATTENTION_MODULES,
    *,
    rank: int = 8,
    alpha: float = 16.0,
    use_rslora: bool = False,
    b_std: float = 0.35,
    seed: int = 0,
) -> Path:
    """Write one random LoRA adapter of the base at ``base_dir`` into ``out_dir``; returns the folder.

    Its ``adapter_config.json`` names ``base_dir`` as the base (PEFT records the
    path the base was loaded from), so packing can check the base's weights.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules),
                        use_rslora=use_rslora, init_lora_weights=False)
    adapted = get_peft_model(model, config)
    with torch.no_grad():
        for name, parameter in adapted.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, b_std)
    adapted.save_pretrained(str(out_dir))
    return Path(out_dir)
