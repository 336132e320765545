"""The micro build end to end: loadable folders, reuse, rebuilds and refusals."""

from __future__ import annotations

import json
import logging
import shutil
import time

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from gatemix.demo.build import build_demo
from gatemix.demo.config import DemoConfig
from gatemix.demo.corpus import load_manifest
from gatemix.demo.errors import DemoBuildError
from gatemix.demo.paths import DemoPaths
from gatemix.demo.stages import STAMP_FILE, run_stage
from gatemix.project import load_project

MODEL_NAMES = ["base", "code", "legal", "docs"]
BASELINE_NAMES = ["monolithic", "monolithic_compute"]


def _stamp(folder):
    return json.loads((folder / STAMP_FILE).read_text())


@pytest.fixture
def demo_copy(micro_demo, tmp_path):
    """A private copy of the micro demo, for tests that change it."""
    shutil.copytree(micro_demo.root, tmp_path / "demo")
    return tmp_path / "demo"


@pytest.fixture(scope="module")
def demo_with_baselines(micro_demo, make_micro_config, tmp_path_factory):
    """The micro demo copied and built again with its baselines."""
    root = tmp_path_factory.mktemp("with-baselines") / "demo"
    shutil.copytree(micro_demo.root, root)
    return build_demo(make_micro_config(root, with_baselines=True))


def test_paths_are_ordered_by_domain(micro_demo):
    assert list(micro_demo.expert_dirs) == ["code", "legal", "docs"]
    assert micro_demo.manifest.is_file()


def test_monolithic_baselines_are_not_built_unless_asked(micro_demo):
    assert micro_demo.monolithic_dir is None and micro_demo.baseline_dirs == {}
    assert not (micro_demo.root / "monolithic").exists()
    assert not (micro_demo.root / "monolithic-compute").exists()
    assert "[baselines]" not in micro_demo.project_file.read_text()


def test_every_model_folder_loads_with_its_own_tokenizer(micro_demo):
    for model_dir in micro_demo.model_dirs().values():
        model = LlamaForCausalLM.from_pretrained(model_dir)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        assert model.dtype == torch.float32
        assert model.config.tie_word_embeddings is False
        assert model.config.vocab_size == len(tokenizer)
        assert model.generation_config.eos_token_id == tokenizer.eos_token_id == 1
        assert (model_dir / "model.safetensors").is_file()


def test_experts_share_the_base_shape(micro_demo):
    manifest = load_manifest(micro_demo.root)
    parameters = {name: manifest["models"][name]["parameters"] for name in MODEL_NAMES}
    assert parameters["code"] == parameters["legal"] == parameters["docs"] == parameters["base"]
    assert manifest["config"]["domains"] == ["code", "legal", "docs"]


def test_baselines_are_labelled_parameter_and_compute_matched(demo_with_baselines):
    paths = demo_with_baselines
    manifest = load_manifest(paths.root)
    models = manifest["models"]
    assert list(paths.baseline_dirs) == BASELINE_NAMES and list(manifest["eval_loss"]) == [
        *MODEL_NAMES, *BASELINE_NAMES]
    labels = {name: json.loads((folder / "baseline.json").read_text())
              for name, folder in paths.baseline_dirs.items()}
    assert labels["monolithic"]["matched"] == "parameters"
    assert labels["monolithic_compute"]["matched"] == "compute"
    # Parameter-matched: bigger, on the tokens base and experts saw together, so more FLOPs.
    expert_tokens = sum(models[name]["trained_tokens"] for name in MODEL_NAMES)
    assert models["monolithic"]["parameters"] > models["base"]["parameters"]
    assert models["monolithic"]["trained_tokens"] == expert_tokens
    assert labels["monolithic"]["compute_vs_experts"] > 1
    # Compute-matched: an expert's shape and the same tokens, so the same training FLOPs.
    assert models["monolithic_compute"]["parameters"] == models["base"]["parameters"]
    assert labels["monolithic_compute"]["trained_tokens"] == expert_tokens
    assert labels["monolithic_compute"]["compute_vs_experts"] == pytest.approx(1.0)
    project = load_project(paths.project_file)
    assert project.baselines == paths.baseline_dirs


def test_built_baselines_stay_in_the_project_without_being_asked_for(demo_with_baselines,
                                                                     make_micro_config):
    before = {name: _stamp(folder)["build_id"] for name, folder in demo_with_baselines.baseline_dirs.items()}
    paths = build_demo(make_micro_config(demo_with_baselines.root))
    assert {name: _stamp(folder)["build_id"] for name, folder in paths.baseline_dirs.items()} == before


def test_manifest_has_an_eval_loss_for_every_model_and_domain(micro_demo):
    manifest = load_manifest(micro_demo.root)
    eval_loss = manifest["eval_loss"]
    assert list(eval_loss) == MODEL_NAMES
    assert set(manifest["best_expert"]) == {"code", "legal", "docs"}
    for losses in eval_loss.values():
        assert list(losses) == ["code", "legal", "docs"]
        assert all(0 < loss < 10 for loss in losses.values())


def test_the_build_ends_with_the_fitted_gate_that_serve_packs(micro_demo):
    from gatemix.engine.project_composite import project_gate_spec
    from gatemix.gate.artifact import load_router

    artifact = load_router(micro_demo.gate_dir)
    assert artifact.expert_names == ["code", "legal", "docs"] and artifact.method == "robust"
    project = load_project(micro_demo.project_file)
    assert project_gate_spec(project) == str(micro_demo.gate_dir)
    assert load_manifest(micro_demo.root)["gate"]["version"] == artifact.version
    assert (micro_demo.gate_dir / "fit" / "report.md").is_file()


def test_out_of_domain_text_is_stored_and_named_by_the_project(micro_demo):
    from gatemix.demo.sources import collect_out_of_domain

    project = load_project(micro_demo.project_file)
    stored = project.out_of_domain_texts()
    assert 0 < len(stored) <= 4
    config = DemoConfig.preset("test", out_dir=micro_demo.root, ood_max_docs=4,
                               max_chars_per_doc=1500, progress=False)
    assert [text for _, text in collect_out_of_domain(config)] == stored  # seeded: the same again
    domain_texts = {text for domain in project.domains for split in ("train", "gate", "eval")
                    for text in project.texts(domain, split)}
    assert not domain_texts & set(stored)


def test_a_second_build_reuses_every_stage_and_does_not_refit(micro_demo, make_micro_config,
                                                             caplog, monkeypatch):
    from gatemix.gate.fit import pipeline as fit_module

    def no_refit(config):
        raise AssertionError("the gate was fitted again")

    monkeypatch.setattr(fit_module, "fit_gate", no_refit)
    before = {name: _stamp(path)["build_id"] for name, path in micro_demo.model_dirs().items()}
    gate_before = _stamp(micro_demo.gate_dir)["build_id"]
    started = time.monotonic()
    with caplog.at_level(logging.INFO, logger="gatemix.demo"):
        paths = build_demo(make_micro_config(micro_demo.root))
    assert time.monotonic() - started < 5
    assert paths == micro_demo
    assert {name: _stamp(path)["build_id"] for name, path in paths.model_dirs().items()} == before
    assert _stamp(paths.gate_dir)["build_id"] == gate_before
    assert "building" not in caplog.text
    # corpus, tokenizer, base, 3 experts, eval, out-of-domain text, gate
    assert caplog.text.count("reusing") == 9


def test_a_changed_gate_setting_refits_the_gate_only(demo_copy, make_micro_config):
    before = DemoPaths.for_config(make_micro_config(demo_copy))
    expert_id = _stamp(before.expert_dirs["code"])["build_id"]
    gate_id = _stamp(before.gate_dir)["build_id"]
    paths = build_demo(make_micro_config(demo_copy, gate_steps=12))
    assert _stamp(paths.expert_dirs["code"])["build_id"] == expert_id
    assert _stamp(paths.gate_dir)["build_id"] != gate_id
    assert (paths.gate_dir / "router.json").is_file()


def test_a_changed_expert_config_rebuilds_experts_and_keeps_the_base(demo_copy,
                                                                     make_micro_config):
    before = DemoPaths.for_config(make_micro_config(demo_copy))
    base_id = _stamp(before.base_dir)["build_id"]
    expert_id = _stamp(before.expert_dirs["code"])["build_id"]
    paths = build_demo(make_micro_config(demo_copy, expert_steps=3, fit_gate=False))
    assert _stamp(paths.base_dir)["build_id"] == base_id
    assert _stamp(paths.expert_dirs["code"])["build_id"] != expert_id
    assert load_manifest(demo_copy)["models"]["code"]["steps"] == 3


def test_an_out_dir_that_is_a_file_is_a_demo_error(tmp_path, make_micro_config):
    out_file = tmp_path / "not-a-folder"
    out_file.write_text("x")
    with pytest.raises(DemoBuildError, match="not a folder"):
        build_demo(make_micro_config(out_file))


def test_a_stamped_stage_missing_its_weights_is_a_demo_error(demo_copy, make_micro_config):
    (demo_copy / "experts" / "legal" / "model.safetensors").unlink()
    with pytest.raises(DemoBuildError, match="corrupt"):
        build_demo(make_micro_config(demo_copy))


def test_an_unreadable_stamp_is_a_demo_error(demo_copy, make_micro_config):
    (demo_copy / "base" / STAMP_FILE).write_text("{not json")
    with pytest.raises(DemoBuildError, match="corrupt stage stamp"):
        build_demo(make_micro_config(demo_copy))


def test_an_interrupted_stage_leaves_nothing_that_looks_done(tmp_path):
    target = tmp_path / "stage"

    def build_then_fail(out):
        (out / "half-written.bin").write_bytes(b"x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_stage("demo stage", target, "key", [], build_then_fail)
    assert list(tmp_path.iterdir()) == []
    stamp = run_stage("demo stage", target, "key", [], lambda out: {"ok": True})
    assert stamp["info"] == {"ok": True} and (target / STAMP_FILE).is_file()
    assert run_stage("demo stage", target, "key", [], lambda out: {"ok": False}) == stamp
