"""`gatemix pack` refuses what a composite cannot hold, with one line and nothing written."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cli_runner import CliResult, run_gatemix

from gatemix.engine.composite_folder import CompositeInfo
from gatemix.engine.pack import pack_composite
from gatemix.gate.artifact import load_router


def _gatemix(*args: str) -> CliResult:
    """In process (``cli_runner``); the first test runs the real ``python -m gatemix.cli``."""
    return run_gatemix(*args)


@pytest.fixture()
def experts(demo_paths, tmp_path) -> list[Path]:
    copies = []
    for name, path in demo_paths.expert_dirs.items():
        copies.append(Path(shutil.copytree(path, tmp_path / "experts" / name)))
    return copies


def _assert_refused(result: CliResult, out: Path, fragment: str) -> None:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert lines and fragment in lines[-1], result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]  # no staging left


def test_pack_writes_a_composite_with_names_hashes_and_gate(experts, tmp_path):
    out = tmp_path / "composite"
    result = subprocess.run(
        [sys.executable, "-m", "gatemix.cli", "pack", *map(str, experts), "--gate", "code=0.5,legal=0.5",
         "--out", str(out)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stderr
    info = CompositeInfo.read(out)
    assert info.expert_names == [p.name for p in experts]
    router = load_router(out / "gate")
    assert router.expert_names == info.expert_names and info.gate_version == router.version
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert {key.split(".")[1] for key in index["weight_map"]} == {str(i) for i in range(len(experts))}


def test_missing_expert_folder_is_refused(experts, tmp_path):
    out = tmp_path / "composite"
    _assert_refused(_gatemix("pack", str(experts[0]), str(tmp_path / "nope"), "--out", str(out)), out, "does not exist")


def test_corrupt_weights_are_refused(experts, tmp_path):
    weights = next(experts[1].glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    out = tmp_path / "composite"
    _assert_refused(_gatemix("pack", *map(str, experts), "--out", str(out)), out, "corrupt safetensors")


def test_corrupt_config_is_refused(experts, tmp_path):
    (experts[0] / "config.json").write_text("{not json")
    out = tmp_path / "composite"
    _assert_refused(_gatemix("pack", *map(str, experts), "--out", str(out)), out, "corrupt config.json")


def test_mismatched_tokenizers_are_refused(experts, tmp_path):
    tokenizer = json.loads((experts[1] / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    first, second = list(vocab)[10:12]
    vocab[first], vocab[second] = vocab[second], vocab[first]  # same size, different ids
    (experts[1] / "tokenizer.json").write_text(json.dumps(tokenizer))
    out = tmp_path / "composite"
    _assert_refused(_gatemix("pack", *map(str, experts), "--out", str(out)), out, "different tokenizers")


def test_a_folder_that_is_not_a_causal_lm_is_refused(experts, tmp_path):
    config = json.loads((experts[2] / "config.json").read_text())
    config["architectures"] = ["BertForMaskedLM"]
    (experts[2] / "config.json").write_text(json.dumps(config))
    out = tmp_path / "composite"
    _assert_refused(_gatemix("pack", *map(str, experts), "--out", str(out)), out, "not a causal language model")


def test_an_architecture_vllm_cannot_build_is_refused(experts, tmp_path):
    config = json.loads((experts[2] / "config.json").read_text())
    config["architectures"] = ["MadeUpForCausalLM"]
    (experts[2] / "config.json").write_text(json.dumps(config))
    out = tmp_path / "composite"
    _assert_refused(_gatemix("pack", *map(str, experts), "--out", str(out)), out, "not supported by the installed vLLM")


def test_gate_naming_an_unknown_expert_is_refused(experts, tmp_path):
    out = tmp_path / "composite"
    _assert_refused(
        _gatemix("pack", *map(str, experts), "--gate", "code=1,poetry=2", "--out", str(out)), out, "unknown experts"
    )


def test_router_fitted_for_other_experts_is_refused(experts, tmp_path):
    first = pack_composite(experts, tmp_path / "first", gate="uniform")
    out = tmp_path / "composite"
    reordered = [experts[1], experts[0], experts[2]]
    _assert_refused(
        _gatemix("pack", *map(str, reordered), "--gate", str(first.path / "gate"), "--out", str(out)), out, "in that order"
    )


def test_router_context_model_the_experts_cannot_share_a_cache_with_is_refused(experts, tmp_path):
    import torch

    from gatemix.expert_folder import expert_hash
    from gatemix.gate.artifact import RouterArtifact, save_router
    from gatemix.gate.router import HiddenStateRouter, RouterForm, context_config_like

    expert_config = json.loads((experts[0] / "config.json").read_text())
    heads = 2 * expert_config["num_attention_heads"]  # same width, half the head size: another KV layout
    context = {**context_config_like(expert_config), "num_attention_heads": heads, "num_key_value_heads": heads}
    context.pop("head_dim", None)
    torch.manual_seed(0)
    router = HiddenStateRouter(RouterForm(len(experts), expert_config["hidden_size"], 0, context))
    names = [p.name for p in experts]
    save_router(
        RouterArtifact(router, names, {n: expert_hash(p) for n, p in zip(names, experts)}, "test"),
        tmp_path / "gate",
    )
    out = tmp_path / "composite"
    _assert_refused(
        _gatemix("pack", *map(str, experts), "--gate", str(tmp_path / "gate"), "--out", str(out)),
        out,
        "(KV heads, head size)",
    )


def test_a_sliding_window_expert_beside_full_attention_ones_is_refused(experts, tmp_path):
    config = json.loads((experts[1] / "config.json").read_text())
    config.update(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=16)
    (experts[1] / "config.json").write_text(json.dumps(config))
    out = tmp_path / "composite"
    _assert_refused(_gatemix("pack", *map(str, experts), "--out", str(out)), out, "attention patterns")


def test_experts_of_different_sizes_and_one_window_pack(experts, tmp_path):
    from gatemix.engine.pack import attention_pattern

    for expert in experts:
        config = json.loads((expert / "config.json").read_text())
        config.update(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=16)
        (expert / "config.json").write_text(json.dumps(config))
    assert attention_pattern(config) == (("sliding_attention",), 16)
    assert attention_pattern({"use_sliding_window": False, "sliding_window": 4096}) == (("full_attention",), None)
    result = _gatemix("pack", *map(str, experts), "--out", str(tmp_path / "composite"))
    assert result.returncode == 0, result.stderr
