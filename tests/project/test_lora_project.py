"""A project whose experts are LoRA adapters of one base, through every job: fit-gate, pack, distill, serve.

One tiny random Llama base with the demo's tokenizer, and three random ``peft``
adapters of it (one on attention, one on every linear layer, one on three
projections); each domain's data is the demo's text as JSONL. Random experts
make the gate's quality meaningless; what is checked is that each job reads
adapters over their one base: the fitted gate records the adapters'
identities, ``gatemix pack --project`` writes a LoRA composite (the base once)
with that gate, ``distill`` trains a student on the adapters' mixture, and
``gatemix serve --project`` serves it: the per-token weights and the log-probs
it reports equal the offline teacher's (the same fitted gate over ``peft``'s
adapters, in transformers).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_runner import run_gatemix

from gatemix.bench.random_adapters import (
    ALL_LINEAR_MODULES,
    ATTENTION_MODULES,
    write_random_lora_adapter,
)
from gatemix.bench.random_experts import ExpertShape, write_random_expert

pytestmark = pytest.mark.slow

ADAPTERS = {"code": ATTENTION_MODULES, "legal": ALL_LINEAR_MODULES, "docs": ("q_proj", "v_proj", "down_proj")}
# Wide initial weights: peaked distributions, so greedy decodes do not hinge on float rounding.
SHAPE = ExpertShape(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=1, max_position_embeddings=256, initializer_range=0.35)
TINY_FIT = {
    "steps": 6, "batch_per_domain": 4, "max_length": 32, "max_sequences": 8, "gate_width": 8, "gate_layers": 1,
    "gate_heads": 2, "sample_length": 6, "q_samples": 8, "distill_samples": 8, "distill_steps": 6,
    "distill_batch_size": 4, "torch_threads": 1, "evaluate": False,
}
TINY_DISTILL = {"steps": 3, "batch_size": 4, "seq_len": 32, "eval_every": 0, "checkpoint_every": 0,
                "warmup_steps": 1, "progress": False, "threads": 2, "init": "config",
                "student_config": "num_hidden_layers=1"}


@pytest.fixture(scope="module")
def lora_project(demo_paths, demo_project, tmp_path_factory) -> Path:
    """The project file: ``[base]`` and three adapter experts, the demo's text as their data."""
    from gatemix.project_writer import write_project_file

    root = tmp_path_factory.mktemp("lora-project")
    base = write_random_expert(root / "base", "llama", SHAPE, tokenizer_dir=demo_paths.tokenizer_dir, seed=0)
    experts = {
        name: write_random_lora_adapter(root / "adapters" / name, base, targets, rank=4, seed=i + 1)
        for i, (name, targets) in enumerate(ADAPTERS.items())
    }
    data = {}
    for domain in experts:
        texts = [text for split in ("train", "gate", "eval") for text in demo_project.texts(domain, split)]
        path = root / "data" / f"{domain}.jsonl"
        path.parent.mkdir(exist_ok=True)
        path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts[:40]))
        data[domain] = {"files": [path]}
    return write_project_file(root / "gatemix.toml", name="lora-ensemble", experts=experts, data=data, base=base)


@pytest.fixture(scope="module")
def fitted(lora_project):
    """fit-gate, then ``gatemix pack --project``: the project, its gate artifact, its composite's info."""
    from gatemix.engine.composite_folder import CompositeInfo
    from gatemix.gate.fit.config import FitGateConfig
    from gatemix.gate.fit.pipeline import fit_gate
    from gatemix.project import load_project

    project = load_project(lora_project)
    artifact = fit_gate(FitGateConfig(project=str(lora_project), **TINY_FIT))
    result = run_gatemix("pack", "--project", str(lora_project))
    assert result.returncode == 0, result.stderr
    return project, artifact, CompositeInfo.read(project.composite_dir)


def test_the_project_reads_adapters_over_its_one_base(lora_project):
    from gatemix.project import load_project

    project = load_project(lora_project)
    folders = project.expert_folders()
    assert project.is_lora and [folder.name for folder in folders] == list(ADAPTERS)
    assert {folder.base.path for folder in folders} == {project.base}
    assert project.tokenizer_dir == project.base
    assert len({folder.weights_hash for folder in folders}) == 3  # the adapter is part of the identity


def test_the_fitted_gate_and_the_packed_lora_composite_name_the_adapters(fitted):
    project, artifact, info = fitted
    hashes = {folder.name: folder.weights_hash for folder in project.expert_folders()}
    assert artifact.expert_hashes == hashes and info.expert_hashes == hashes
    config = json.loads((info.path / "config.json").read_text())
    assert config["architectures"] == ["GatemixLoRAForCausalLM"]
    assert info.gate_version == artifact.version and info.gate_method == "robust"
    base_weights = sum(path.stat().st_size for path in project.base.glob("*.safetensors"))
    weights = sum(path.stat().st_size for path in info.path.rglob("*.safetensors"))
    assert weights < 1.3 * base_weights  # the base once, and three small adapters


def test_distill_trains_a_student_on_the_adapters_mixture(fitted, tmp_path):
    from gatemix.distill.config import DistillConfig
    from gatemix.distill.train import distill

    project, _, info = fitted
    student = distill(DistillConfig(project=str(project.path), out_dir=str(tmp_path / "student"),
                                    cache_dir=str(tmp_path / "cache"), **TINY_DISTILL))
    record = json.loads((student / "distill.json").read_text())
    assert record["teacher"]["composite"] == str(info.path)
    assert (student / "tokenizer.json").read_bytes() == (project.base / "tokenizer.json").read_bytes()
    assert json.loads((student / "config.json").read_text())["num_hidden_layers"] == 1


def test_serve_project_serves_the_lora_composite_with_the_teacher_s_weights_and_logprobs(fitted, tmp_path):
    import openai
    from server_harness import ENSEMBLE, running_server

    from gatemix.distill.teacher import EnsembleTeacher

    project, _, info = fitted
    teacher = EnsembleTeacher.load(info.path, project.expert_folders())
    with running_server(None, tmp_path, project=project.path) as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
        cards = {card.id: card for card in client.models.list().data}
        assert cards[ENSEMBLE].model_extra["experts"] == list(ADAPTERS)
        response = client.completions.create(
            model=ENSEMBLE, prompt="def add(a, b):", max_tokens=8, temperature=0.0, logprobs=1,
            extra_body={"ignore_eos": True, "mixture": {"per_token": True}, "return_token_ids": True})
    choice = response.choices[0]
    prompt_ids, token_ids = choice.model_extra["prompt_token_ids"], choice.model_extra["token_ids"]
    mixture, log_weights = teacher(torch.tensor([prompt_ids + token_ids]))
    start = len(prompt_ids) - 1  # position p decides token p + 1
    expected_weights = log_weights[0, start : start + len(token_ids)].exp().double()
    served_weights = torch.tensor(choice.model_extra["mixture"]["per_token"], dtype=torch.float64)
    torch.testing.assert_close(served_weights, expected_weights, atol=1e-4, rtol=0)
    expected_logprobs = mixture[0, start : start + len(token_ids)].gather(-1, torch.tensor(token_ids)[:, None])
    torch.testing.assert_close(torch.tensor(choice.logprobs.token_logprobs, dtype=torch.float64),
                               expected_logprobs[:, 0].double(), atol=1e-3, rtol=0)
    assert token_ids == mixture[0, start : start + len(token_ids)].argmax(-1).tolist()
