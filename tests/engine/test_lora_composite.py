"""K LoRA adapters of one base in one composite serve the exact mixture: checked against transformers + peft.

For a tiny random Llama base and a tiny random Qwen2 base (q/k/v biases), three
random adapters each, written by ``peft`` (rank 8 on q/k/v/o; rank 8 on every
linear layer with rsLoRA scaling; rank 4 on q/v/down, so the stacked ranks
differ), are packed with ``--base`` and served by the real vLLM engine in
float32. The reference is independent of gatemix: each adapter applied to the
base by ``peft`` itself, run in float64, the softmaxes mixed in probability
space. One engine start per base.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from arch_experts import make_expert
from reference_checks import check_greedy, check_top_logprobs

from gatemix.bench.random_adapters import (
    ALL_LINEAR_MODULES,
    ATTENTION_MODULES,
    write_random_lora_adapter,
)
from gatemix.demo.corpus import load_split
from gatemix.engine.engine_config import build_offline_engine, stopping
from gatemix.engine.lora_pack import pack_lora_composite

TOP = 20
GREEDY_TOKENS = 32
NUM_PROMPTS = 5
# name -> (target modules, rank, alpha, rsLoRA)
ADAPTERS = {
    "attention": (ATTENTION_MODULES, 8, 16.0, False),
    "every-linear": (ALL_LINEAR_MODULES, 8, 8.0, True),
    "partial": (("q_proj", "v_proj", "down_proj"), 4, 8.0, False),
}
WEIGHT_SETTINGS = {"uniform": None, "skewed": [0.7, 0.2, 0.1], "one-hot": [0.0, 1.0, 0.0]}
BASES = ("llama", "qwen2")


class PeftMixture:
    """The mixture of the adapters, each applied to the base by ``peft``, in float64."""

    def __init__(self, base_dir: Path, adapter_dirs: list[Path]) -> None:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        def load(adapter_dir: Path | None) -> torch.nn.Module:
            model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float64)
            if adapter_dir is not None:
                model = PeftModel.from_pretrained(model, str(adapter_dir))
            return model.double().eval()

        self.experts = [load(adapter_dir) for adapter_dir in adapter_dirs]
        self.base = load(None)

    @torch.no_grad()
    def probs(self, model: torch.nn.Module, token_ids: list[int]) -> torch.Tensor:
        return torch.softmax(model(torch.tensor([token_ids])).logits[0, -1].double(), -1)

    def next_logprobs(self, token_ids: list[int], weights: list[float] | None) -> torch.Tensor:
        """``(V,)`` float64 log sum_k w_k p_k(. | token_ids); ``None``: uniform."""
        weights = weights or [1.0] * len(self.experts)
        mixed = sum(w * self.probs(expert, token_ids) for w, expert in zip(weights, self.experts) if w > 0)
        return torch.log(mixed / sum(weights))


def _prompts(demo_paths) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_paths.tokenizer_dir)
    texts = [text[:300] for domain in demo_paths.expert_dirs for text in load_split(demo_paths.root, domain, "eval")[:2]]
    prompts = [tokenizer(text, add_special_tokens=False).input_ids[:24] for text in texts]
    return [p for p in prompts if len(p) >= 8][:NUM_PROMPTS]


@pytest.fixture(scope="module", params=BASES)
def served(request, demo_paths, tmp_path_factory):
    """One base with three adapters, packed and served; its peft reference and the prompts."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp(f"lora-{request.param}")
    base = make_expert(root / "base", request.param, demo_paths.tokenizer_dir, seed=0)
    adapters = [
        write_random_lora_adapter(root / name, base, targets, rank=rank, alpha=alpha, use_rslora=rslora, seed=i + 1)
        for i, (name, (targets, rank, alpha, rslora)) in enumerate(ADAPTERS.items())
    ]
    composite = root / "composite"
    pack_lora_composite(base, adapters, composite, gate="uniform")
    reference = PeftMixture(base, adapters)
    with stopping(build_offline_engine(composite, dtype="float32", max_model_len=128, max_num_seqs=8)) as llm:
        yield llm, reference, _prompts(demo_paths)


@pytest.mark.slow
def test_every_adapter_moves_the_base_distribution(served):
    _, reference, prompts = served
    assert len(prompts) == NUM_PROMPTS
    for expert in reference.experts:
        distance = [0.5 * (reference.probs(expert, p) - reference.probs(reference.base, p)).abs().sum() for p in prompts]
        assert min(distance) > 0.2, distance  # total variation from the base on every prompt


@pytest.mark.slow
@pytest.mark.parametrize("setting", list(WEIGHT_SETTINGS))
def test_next_token_logprobs_equal_the_peft_mixture(served, setting):
    llm, reference, prompts = served
    check_top_logprobs(llm, reference, prompts, WEIGHT_SETTINGS[setting], top=TOP)


@pytest.mark.slow
@pytest.mark.parametrize("setting", list(WEIGHT_SETTINGS))
def test_greedy_decodes_equal_the_peft_mixture(served, setting):
    llm, reference, prompts = served
    check_greedy(llm, reference, prompts, WEIGHT_SETTINGS[setting], GREEDY_TOKENS)
