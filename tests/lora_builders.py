"""Tiny LoRA families for the tests: a random base, adapters of it written by ``peft``, a look-alike base.

The bases have their own word tokenizer and no demo build behind them: a family
is written in seconds, for tests that check what packing and the project file
accept or refuse (the engine tests build their own, with the demo's tokenizer).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from gatemix.bench.random_adapters import ALL_LINEAR_MODULES, write_random_lora_adapter
from gatemix.bench.random_experts import ExpertShape, write_random_expert

SHAPE = ExpertShape(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=1, head_dim=32, vocab_size=48)


def write_lora_family(root: Path) -> dict[str, Path]:
    """A base, two adapters of it (attention only; every linear layer), a same-shaped other base
    and an adapter of that one."""
    torch.set_num_threads(1)
    base = write_random_expert(root / "base", "llama", SHAPE, seed=0)
    other_base = write_random_expert(root / "other-base", "llama", SHAPE, seed=1)
    return {
        "base": base, "other-base": other_base, "root": root,
        "attention": write_random_lora_adapter(root / "attention", base, seed=2),
        "every-linear": write_random_lora_adapter(root / "every-linear", base, ALL_LINEAR_MODULES, seed=3),
        "of-other": write_random_lora_adapter(root / "of-other", other_base, seed=4),
    }


def copy_adapter(source: Path, target: Path, **config_changes) -> Path:
    """A copy of an adapter folder, its adapter_config.json changed by ``config_changes``."""
    shutil.copytree(source, target)
    config = json.loads((target / "adapter_config.json").read_text())
    (target / "adapter_config.json").write_text(json.dumps({**config, **config_changes}))
    return target
