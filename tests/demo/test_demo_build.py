"""The micro build end to end: loadable folders, reuse, rebuilds and refusals."""

from __future__ import annotations

import json
import logging
import shutil
import time

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from gatemix.demo.build import DemoPaths, build_demo
from gatemix.demo.corpus import load_manifest
from gatemix.demo.errors import DemoBuildError
from gatemix.demo.stages import STAMP_FILE, run_stage

MODEL_NAMES = ["base", "code", "legal", "docs", "monolithic"]


def _stamp(folder):
    return json.loads((folder / STAMP_FILE).read_text())


@pytest.fixture
def demo_copy(micro_demo, tmp_path):
    """A private copy of the micro demo, for tests that change it."""
    shutil.copytree(micro_demo.root, tmp_path / "demo")
    return tmp_path / "demo"


def test_paths_are_ordered_by_domain(micro_demo):
    assert list(micro_demo.expert_dirs) == ["code", "legal", "docs"]
    assert micro_demo.monolithic_dir == micro_demo.root / "monolithic"
    assert micro_demo.manifest.is_file()


def test_every_model_folder_loads_with_its_own_tokenizer(micro_demo):
    for model_dir in micro_demo.model_dirs().values():
        model = LlamaForCausalLM.from_pretrained(model_dir)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        assert model.dtype == torch.float32
        assert model.config.tie_word_embeddings is False
        assert model.config.vocab_size == len(tokenizer)
        assert model.generation_config.eos_token_id == tokenizer.eos_token_id == 1
        assert (model_dir / "model.safetensors").is_file()


def test_experts_share_the_base_shape_and_monolithic_is_bigger(micro_demo):
    manifest = load_manifest(micro_demo.root)
    parameters = {name: manifest["models"][name]["parameters"] for name in MODEL_NAMES}
    assert parameters["code"] == parameters["legal"] == parameters["docs"] == parameters["base"]
    assert parameters["monolithic"] > parameters["base"]
    steps = manifest["config"]
    assert manifest["models"]["monolithic"]["trained_tokens"] == sum(
        manifest["models"][name]["trained_tokens"] for name in ["base", "code", "legal", "docs"])
    assert steps["domains"] == ["code", "legal", "docs"]


def test_manifest_has_an_eval_loss_for_every_model_and_domain(micro_demo):
    manifest = load_manifest(micro_demo.root)
    eval_loss = manifest["eval_loss"]
    assert list(eval_loss) == MODEL_NAMES
    assert set(manifest["best_expert"]) == {"code", "legal", "docs"}
    for losses in eval_loss.values():
        assert list(losses) == ["code", "legal", "docs"]
        assert all(0 < loss < 10 for loss in losses.values())


def test_a_second_build_reuses_every_stage(micro_demo, make_micro_config, caplog):
    before = {name: _stamp(path)["build_id"] for name, path in micro_demo.model_dirs().items()}
    started = time.monotonic()
    with caplog.at_level(logging.INFO, logger="gatemix.demo"):
        paths = build_demo(make_micro_config(micro_demo.root))
    assert time.monotonic() - started < 5
    assert paths == micro_demo
    assert {name: _stamp(path)["build_id"] for name, path in paths.model_dirs().items()} == before
    assert "building" not in caplog.text
    assert caplog.text.count("reusing") == 8  # corpus, tokenizer, base, 3 experts, mono, eval


def test_a_changed_expert_config_rebuilds_experts_and_keeps_the_base(demo_copy,
                                                                     make_micro_config):
    before = DemoPaths.for_config(make_micro_config(demo_copy))
    base_id = _stamp(before.base_dir)["build_id"]
    expert_id = _stamp(before.expert_dirs["code"])["build_id"]
    paths = build_demo(make_micro_config(demo_copy, expert_steps=3))
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
