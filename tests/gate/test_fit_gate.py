"""``fit_gate`` end to end on a hand-made micro demo: random tiny Llama experts, a word tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
from micro_demo import micro_demo_project


@pytest.fixture(scope="module")
def micro_demo(tmp_path_factory) -> Path:
    return micro_demo_project(tmp_path_factory.mktemp("micro-demo"))


def test_expert_hash_changes_with_the_weights_and_only_with_them(micro_demo, tmp_path):
    import shutil

    from gatemix.expert_folder import expert_hash

    folder = micro_demo / "experts" / "code"
    copy = tmp_path / "code"
    shutil.copytree(folder, copy)
    assert expert_hash(copy) == expert_hash(folder)  # the content, not the path
    assert expert_hash(folder) != expert_hash(micro_demo / "experts" / "legal")
    from safetensors.torch import load_file, save_file

    weights = load_file(str(copy / "model.safetensors"))
    name = next(iter(weights))
    weights[name] = weights[name] + 1e-3
    save_file(weights, str(copy / "model.safetensors"), metadata={"format": "pt"})
    assert expert_hash(copy) != expert_hash(folder)


def _micro_config(micro_demo: Path, tmp_path: Path, **overrides):
    """A fit sized for the micro demo: seconds on one thread."""
    from gatemix.gate.fit.config import FitGateConfig

    values = {
        "project": str(micro_demo),
        "out_dir": str(tmp_path / "router"),
        "cache_dir": str(tmp_path / "cache"),
        "batch_per_domain": 4,
        "max_length": 12,
        "gate_width": 8,
        "gate_layers": 1,
        "gate_heads": 2,
        "sample_length": 6,
        "torch_threads": 1,
        "progress": False,
    }
    return FitGateConfig(**{**values, **overrides})


def test_fit_gate_writes_a_loadable_robust_router_and_a_report(micro_demo, tmp_path):
    from gatemix.expert_folder import expert_hash
    from gatemix.gate.artifact import load_router
    from gatemix.gate.fit.config import FitGateConfig
    from gatemix.gate.fit.pipeline import fit_gate

    config = _micro_config(
        micro_demo,
        tmp_path,
        steps=20,
        checkpoint_every=10,
        distill_samples=16,
        distill_steps=10,
        distill_batch_size=8,
        router_context_layers=1,  # the router's own causal Llama, saved and reloaded with it
        switching_sequences=6,
    )
    artifact = fit_gate(config)
    loaded = load_router(tmp_path / "router")
    assert loaded.version == artifact.version and loaded.method == "robust"
    assert loaded.expert_names == ["code", "legal"]
    loaded.check_experts(
        ["code", "legal"], {d: expert_hash(micro_demo / "experts" / d) for d in ("code", "legal")}
    )
    assert abs(sum(loaded.details["lambda_avg"]) - 1) < 1e-9
    assert loaded.router.context is not None and loaded.router.form.context_config["num_hidden_layers"] == 1
    assert loaded.details["served_router"] in ("two_stage", *FitGateConfig().family)
    report = (tmp_path / "router" / "fit" / "report.md").read_text()
    for method in ("robust_router", "erm", "uniform", "posterior", "robust_constant",
                   "robust_constant_per_token", "two_stage_router", *FitGateConfig().family):
        assert f"| {method} |" in report
    for section in ("switching documents", "out-of-domain text", "## Targets for the served router",
                    "## Convergence of the primal-dual games", "| sequence gate (stage 1) |"):
        assert section in report
    evaluation = loaded.details["evaluation"]["robust_router"]
    assert {"switching", "out_of_domain"} <= set(evaluation)
    assert loaded.details["sequence_gate"]["gap"]["total"] >= 0
    assert (tmp_path / "router" / "fit" / "primal_dual.png").is_file()
    assert list((tmp_path / "cache").glob("*.safetensors"))  # features were cached


def _flags(config) -> list[str]:
    """The CLI flags that reproduce ``config`` (its non-default fields)."""
    import dataclasses

    from gatemix.gate.fit.config import FitGateConfig

    defaults, flags = FitGateConfig(), []
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if value == getattr(defaults, field.name):
            continue
        name = "--" + field.name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(name if value else "--no-" + name[2:])
        else:
            flags += [name, str(value)]
    return flags


def test_distill_gate_redoes_only_the_second_stage(micro_demo, tmp_path, monkeypatch):
    from gatemix.cli import main
    from gatemix.gate.artifact import load_router
    from gatemix.gate.fit import pipeline as fit_module
    from gatemix.gate.fit.pipeline import fit_gate
    from gatemix.gate.fit.sequence_gate import SequenceGate

    config = _micro_config(
        micro_demo,
        tmp_path,
        steps=12,
        distill_samples=8,
        q_samples=16,
        distill_steps=5,
        distill_batch_size=4,
        evaluate=False,
    )
    assert main(["distill-gate", *_flags(config)]) == 2  # no finished fit yet: refused
    first = fit_gate(config)
    games_played = []
    real_loop = fit_module.run_primal_dual

    def counting_loop(model, *args, **kwargs):
        games_played.append(type(model))
        return real_loop(model, *args, **kwargs)

    monkeypatch.setattr(fit_module, "run_primal_dual", counting_loop)
    assert main(["distill-gate", *_flags(config), "--distill-source", "data"]) == 0
    assert SequenceGate not in games_played  # stage 1 was read back, not replayed
    second = load_router(tmp_path / "router")
    assert second.details["distillation"]["source"] == "data" != first.details["distillation"]["source"]
    assert second.details["sequence_gate"]["lambda_avg"] == first.details["sequence_gate"]["lambda_avg"]
    assert second.version != first.version


def test_distill_gate_is_fit_gate_stage_router_and_warns_once(monkeypatch, capsys):
    from gatemix.cli import main
    from gatemix.gate.fit import pipeline

    stages = []
    monkeypatch.setattr(pipeline, "fit_gate", lambda config, stage="all": stages.append(stage))
    assert main(["distill-gate", "--project", "p"]) == 0
    assert main(["fit-gate", "--stage", "router", "--project", "p"]) == 0
    assert main(["fit-gate", "--project", "p"]) == 0
    assert stages == ["router", "router", "all"]
    warnings = [line for line in capsys.readouterr().err.splitlines() if "deprecated" in line]
    assert warnings == ["gatemix distill-gate is deprecated; use gatemix fit-gate --stage router"]
