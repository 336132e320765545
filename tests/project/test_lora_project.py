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
    "served_router": "posterior_router",  # the hidden-state router over the posterior state
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
    assert artifact.router.form.posterior  # the served gate reads the prefix posterior
    base_weights = sum(path.stat().st_size for path in project.base.glob("*.safetensors"))
    weights = sum(path.stat().st_size for path in info.path.rglob("*.safetensors"))
    assert weights < 1.3 * base_weights  # the base once, and three small adapters


@pytest.fixture(scope="module")
def student(fitted, tmp_path_factory) -> Path:
    """``distill`` over the project: a one-layer student of the adapters' mixture."""
    from gatemix.distill.config import DistillConfig
    from gatemix.distill.train import distill

    project, _, _ = fitted
    root = tmp_path_factory.mktemp("lora-student")
    return distill(DistillConfig(project=str(project.path), out_dir=str(root / "student"),
                                 cache_dir=str(root / "cache"), **TINY_DISTILL))


def test_distill_trains_a_student_on_the_adapters_mixture(fitted, student):
    project, _, info = fitted
    record = json.loads((student / "distill.json").read_text())
    assert record["teacher"]["composite"] == str(info.path)
    assert (student / "tokenizer.json").read_bytes() == (project.base / "tokenizer.json").read_bytes()
    assert json.loads((student / "config.json").read_text())["num_hidden_layers"] == 1


def _completion(client, **mixture) -> tuple[list[int], list[int], list[float], torch.Tensor]:
    """Greedy, 8 tokens: (prompt ids, token ids, their log-probs, the per-token weights (8, K))."""
    from server_harness import ENSEMBLE

    response = client.completions.create(
        model=ENSEMBLE, prompt="def add(a, b):", max_tokens=8, temperature=0.0, logprobs=1,
        extra_body={"ignore_eos": True, "mixture": {"per_token": True, **mixture}, "return_token_ids": True})
    choice = response.choices[0]
    return (choice.model_extra["prompt_token_ids"], choice.model_extra["token_ids"], choice.logprobs.token_logprobs,
            torch.tensor(choice.model_extra["mixture"]["per_token"], dtype=torch.float64))


def test_serve_project_serves_the_lora_composite_behind_the_student_exactly(fitted, student, tmp_path):
    """The fitted gate, a pin and a reloaded gate, each against transformers + peft, with the
    distilled student as the speculative draft (its proposals must leave no trace)."""
    import httpx
    import openai
    from server_harness import ENSEMBLE, post_gate, running_server

    from gatemix.distill.teacher import EnsembleTeacher
    from gatemix.engine.pack import parse_gate_spec
    from gatemix.gate.artifact import save_router

    project, _, info = fitted
    constant = tmp_path / "constant-gate"
    save_router(parse_gate_spec("code=0.5,legal=0.3,docs=0.2", project.expert_folders()), constant)
    with running_server(None, tmp_path, "--draft", str(student), "--num-draft-tokens", "2", "--admin-key", "k",
                        project=project.path) as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
        card = {card.id: card for card in client.models.list().data}[ENSEMBLE].model_extra
        assert card["experts"] == list(ADAPTERS) and card["draft"]["model"] == str(student)
        routed = _completion(client)
        pinned = _completion(client, weights={"legal": 1.0})
        reload = post_gate(url, constant, {"Authorization": "Bearer k"})
        assert reload.status_code == 200, reload.text
        reloaded = _completion(client)
        weighted = _weighted_tokens(httpx.get(f"{url}/metrics").text)
    # The metrics count the LoRA composite's experts as a full composite's: each expert's weight summed over
    # the tokens served, which add up to the tokens (3 completions of 8).
    served = sum(completion[3].sum(0) for completion in (routed, pinned, reloaded))  # (K,)
    assert list(weighted) == list(ADAPTERS)
    torch.testing.assert_close(torch.tensor(list(weighted.values()), dtype=torch.float64), served, atol=1e-3, rtol=0)
    assert sum(weighted.values()) == pytest.approx(24.0, abs=1e-3)
    teacher = EnsembleTeacher.load(info.path, project.expert_folders())
    _check_against(teacher, *routed)
    _check_against(teacher, *pinned, pin=1)
    assert torch.allclose(reloaded[3], torch.tensor([[0.5, 0.3, 0.2]] * 8, dtype=torch.float64), atol=1e-5)
    _check_against(teacher, *reloaded[:3], None, weights=torch.tensor([0.5, 0.3, 0.2]))


def _weighted_tokens(metrics_text: str) -> dict[str, float]:
    """``gatemix_gate_weighted_tokens_total`` of the ensemble, by expert."""
    from prometheus_client.parser import text_string_to_metric_families
    from server_harness import ENSEMBLE

    return {sample.labels["expert"]: sample.value
            for family in text_string_to_metric_families(metrics_text) if family.name == "gatemix_gate_weighted_tokens"
            for sample in family.samples
            if sample.name == "gatemix_gate_weighted_tokens_total" and sample.labels.get("model") == ENSEMBLE}


def _check_against(teacher, prompt_ids, token_ids, logprobs, served_weights, pin=None, weights=None):
    """The served tokens, log-probs and weights equal the teacher's: its router, one expert, or fixed weights."""
    ids = torch.tensor([prompt_ids + token_ids])
    start, end = len(prompt_ids) - 1, len(prompt_ids) - 1 + len(token_ids)  # position p decides token p + 1
    mixture, log_weights = teacher(ids)
    if pin is not None or weights is not None:
        expert_logprobs = torch.stack(
            [torch.log_softmax(expert(input_ids=ids).logits.float(), -1) for expert in teacher.experts], -2)
        log_weights = torch.full_like(log_weights, float("-inf"))
        if pin is not None:
            log_weights[..., pin] = 0.0
        else:
            log_weights[:] = weights.log()
        mixture = torch.logsumexp(expert_logprobs + log_weights[..., None], -2)
    if served_weights is not None:
        torch.testing.assert_close(served_weights, log_weights[0, start:end].exp().double(), atol=1e-4, rtol=0)
    expected = mixture[0, start:end]
    assert token_ids == expected.argmax(-1).tolist()
    torch.testing.assert_close(torch.tensor(logprobs, dtype=torch.float64),
                               expected.gather(-1, torch.tensor(token_ids)[:, None])[:, 0].double(), atol=1e-3, rtol=0)
