"""Every required architecture through the whole pipeline: project file, fit-gate, pack, vLLM.

Two composites hold the five architectures (Llama, Mistral, Qwen2 with q/k/v
biases, Qwen2 with tied embeddings, Qwen3 with q/k norms), each three randomly
initialised experts of three architectures and three sizes (wider, deeper, more
KV heads, a head size of 64) that share the demo tokenizer. A project file names
them and the demo's text; ``fit_gate`` fits a router on tiny settings;
``pack --project`` writes the composite; the real vLLM engine serves it in
float32. The reference is independent of the engine: each expert run by
``transformers`` from its own folder, the fitted router applied to their hidden
states there (``EnsembleTeacher``), or the pinned weights mixed in float64. A
one-hot pin is that one architecture alone, so every architecture is checked by
itself and inside a mixture; two composites rather than one per architecture
keep the engine starts (the test's cost) to two.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from arch_experts import ARCHITECTURES, make_expert
from cli_runner import run_gatemix
from reference_checks import check_greedy, check_top_logprobs

from gatemix.engine.engine_config import build_offline_engine, stopping

TOP = 20
GREEDY_TOKENS = 32
NUM_PROMPTS = 5
# The first weight setting is the fitted router's (no pin): weights per token from hidden states.
PINS = {"fitted router": None, "mixed": [0.5, 0.3, 0.2], "one-hot code": [1.0, 0.0, 0.0],
        "one-hot legal": [0.0, 1.0, 0.0], "one-hot docs": [0.0, 0.0, 1.0]}
BIGGER = {"hidden_size": 128, "num_attention_heads": 4, "num_hidden_layers": 3, "num_key_value_heads": 2, "intermediate_size": 256}
HEAD_64 = {"hidden_size": 128, "head_dim": 64, "num_attention_heads": 2}
# Expert (domain) -> (architecture, shape); every architecture appears at least once.
COMPOSITES = {
    "llama-qwen3-mistral": {"code": ("llama", {}), "legal": ("qwen3", BIGGER), "docs": ("mistral", HEAD_64)},
    "mistral-qwen2-tied": {"code": ("mistral", {}), "legal": ("qwen2", BIGGER), "docs": ("qwen2-tied", {})},
}
DOMAINS = ("code", "legal")
TINY_FIT = {
    "steps": 10, "batch_per_domain": 4, "max_length": 32, "max_sequences": 8, "gate_width": 8, "gate_layers": 1,
    "gate_heads": 2, "sample_length": 6, "q_samples": 16, "distill_samples": 8, "distill_steps": 20,
    "distill_batch_size": 4, "torch_threads": 1, "evaluate": False,
}


def _project(root: Path, demo_paths, experts: dict[str, tuple[str, dict]]) -> Path:
    """Random experts (name -> (architecture, shape)) and the demo's text of the same domains."""
    from gatemix.project_writer import write_project_file

    folders = {
        name: make_expert(root / name, architecture, demo_paths.tokenizer_dir, seed=index, **shape)
        for index, (name, (architecture, shape)) in enumerate(experts.items())
    }
    data = {
        name: {split: [demo_paths.data_dir / name / f"{split}.jsonl"] for split in ("gate", "eval")}
        for name in experts
    }
    return write_project_file(root / "gatemix.toml", name="arch-test", experts=folders, data=data)


def _fit_and_pack(project_file: Path, tmp_path: Path) -> Path:
    from gatemix.gate.fit.config import FitGateConfig
    from gatemix.gate.fit.pipeline import fit_gate
    from gatemix.project import load_project

    fit_gate(FitGateConfig(project=str(project_file), cache_dir=str(tmp_path / "features"), **TINY_FIT))
    result = run_gatemix("pack", "--project", str(project_file))
    assert result.returncode == 0, result.stderr
    return load_project(project_file).composite_dir


class Reference:
    """The mixture computed by transformers from the experts' own folders."""

    def __init__(self, project_file: Path) -> None:
        from gatemix.distill.teacher import EnsembleTeacher
        from gatemix.gate.artifact import load_router
        from gatemix.project import load_project

        project = load_project(project_file)
        self.teacher = EnsembleTeacher.from_experts(
            list(project.experts.values()), load_router(project.gate_dir).router
        )

    @torch.no_grad()
    def next_logprobs(self, token_ids: list[int], pin: list[float] | None) -> torch.Tensor:
        """``(V,)`` log-probs of the next token: the fitted router's mixture, or the pinned one in float64."""
        ids = torch.tensor([token_ids])
        if pin is None:
            return self.teacher(ids)[0][0, -1].double()
        probs = [torch.softmax(expert(ids).logits[0, -1].double(), -1) for expert in self.teacher.experts]
        return torch.log(sum(weight * p for weight, p in zip(pin, probs)))


def _prompts(demo_paths, tokenizer_dir: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    from gatemix.project import load_project

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    project = load_project(demo_paths.project_file)
    texts = [text[:300] for domain in DOMAINS for text in project.texts(domain, "eval")[:3]]
    prompts = [tokenizer(text).input_ids[:24] for text in texts]
    return [p for p in prompts if len(p) >= 8][:NUM_PROMPTS]


@pytest.fixture(scope="module", params=list(COMPOSITES))
def served(request, demo_paths, tmp_path_factory):
    """One composite of three architectures in the real engine, with its reference and prompts."""
    root = tmp_path_factory.mktemp(f"arch-{request.param}")
    project_file = _project(root, demo_paths, COMPOSITES[request.param])
    composite = _fit_and_pack(project_file, root)
    with stopping(build_offline_engine(composite, dtype="float32", max_model_len=128, max_num_seqs=8)) as llm:
        yield llm, Reference(project_file), _prompts(demo_paths, demo_paths.tokenizer_dir)


@pytest.mark.slow
@pytest.mark.parametrize("setting", list(PINS))
def test_next_token_logprobs_equal_the_transformers_mixture(served, setting):
    llm, reference, prompts = served
    assert len(prompts) == NUM_PROMPTS
    check_top_logprobs(llm, reference, prompts, PINS[setting], top=TOP)


@pytest.mark.slow
@pytest.mark.parametrize("setting", list(PINS))
def test_greedy_decodes_match_the_transformers_mixture(served, setting):
    llm, reference, prompts = served
    check_greedy(llm, reference, prompts, PINS[setting], GREEDY_TOKENS)


def test_every_architecture_is_served():
    served_architectures = {architecture for experts in COMPOSITES.values() for architecture, _ in experts.values()}
    assert served_architectures == set(ARCHITECTURES)
