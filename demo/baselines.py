"""The demo's two monolithic baselines, built only for the report and the benchmarks.

- ``monolithic`` (parameter-matched): one dense model of about the K experts'
  total parameters, trained from scratch on the pooled train split for as many
  tokens as the base and the experts saw together. A larger model on the same
  tokens: it costs several times the training FLOPs of base + experts.
- ``monolithic_compute`` (compute-matched): the base itself, trained on for the
  experts' steps together (K x ``expert_steps``) on the pooled train split with
  the experts' schedule. Same shape as an expert and the same tokens as base
  and experts together, so exactly their training FLOPs (~6 N D); the
  Branch-Train-Merge comparison at equal compute.

Each folder carries ``baseline.json`` (what it is matched on, its parameters and
training FLOPs against the experts'), which the gate report labels rows with.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from gatemix.demo import train
from gatemix.demo.config import BASELINE_NAMES, DemoConfig
from gatemix.demo.train import LlamaShape

BASELINE_FILE = "baseline.json"  # read by gate/fit/report.py: the row's label


def training_flops(parameters: int, tokens: int) -> float:
    """The usual ``6 N D`` estimate of a training run's FLOPs (forward and backward)."""
    return 6.0 * parameters * tokens


@dataclass(frozen=True)
class Baseline:
    name: str
    folder: str  # under the demo root
    matched: str  # "parameters" or "compute"
    about: str
    steps: Callable[[DemoConfig], int]
    seed_offset: int


BASELINES = (
    Baseline("monolithic", "monolithic", "parameters",
             "about the experts' total parameters, from scratch on the pooled train split for the "
             "tokens base and experts saw together", lambda c: c.monolithic_steps, 100),
    Baseline("monolithic_compute", "monolithic-compute", "compute",
             "the base trained on for the experts' steps together on the pooled train split: an "
             "expert's shape and base + experts' training FLOPs", lambda c: c.compute_matched_steps,
             200),
)


assert tuple(b.name for b in BASELINES) == BASELINE_NAMES


def monolithic_shape(config: DemoConfig) -> LlamaShape:
    return LlamaShape(config.mono_hidden_size, config.mono_num_layers, config.mono_num_heads,
                      config.mono_num_kv_heads, config.mono_intermediate_size)


def new_baseline_model(baseline: Baseline, config: DemoConfig, base_dir: Path,
                       model_config) -> LlamaForCausalLM:
    """The model a baseline starts from: a fresh dense model, or the saved base."""
    if baseline.matched == "compute":
        return LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return train.new_model(model_config, config.seed + baseline.seed_offset)


def learning_rate(baseline: Baseline, config: DemoConfig) -> float:
    return config.expert_learning_rate if baseline.matched == "compute" else config.mono_learning_rate


def write_baseline_file(folder: Path, baseline: Baseline, info: dict, experts_flops: float,
                        base_tokens: int) -> dict:
    """``baseline.json``: the label, the parameters and the training FLOPs against the experts'."""
    own_tokens = info["trained_tokens"] + (base_tokens if baseline.matched == "compute" else 0)
    flops = training_flops(info["parameters"], own_tokens)
    record = {
        "name": baseline.name,
        "matched": baseline.matched,
        "about": baseline.about,
        "parameters": info["parameters"],
        "trained_tokens": own_tokens,
        "train_flops": flops,
        "experts_train_flops": experts_flops,
        "compute_vs_experts": round(flops / experts_flops, 3),
    }
    (folder / BASELINE_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return record


def experts_training_flops(parameters: int, base_tokens: int, expert_tokens: list[int]) -> float:
    """Base + every expert: what a compute-matched dense model may spend."""
    return training_flops(parameters, base_tokens + sum(expert_tokens))
