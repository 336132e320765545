"""Packing LoRA experts: one base and K PEFT adapters into one composite, or a one-line refusal.

A tiny random Llama base with its own word tokenizer and adapters written by
``peft`` itself (``gatemix.bench.random_adapters``): no demo build, no engine.
"""

from __future__ import annotations

import json

import pytest
from cli_runner import run_gatemix
from lora_builders import copy_adapter, write_lora_family

from gatemix.bench.random_adapters import write_random_lora_adapter
from gatemix.bench.random_experts import ExpertShape, write_random_expert
from gatemix.engine.composite_folder import (
    CompositeInfo,
    PackError,
    adapter_dir,
    is_lora_composite_folder,
)
from gatemix.engine.engine_config import EngineSettings, check_engine_settings
from gatemix.engine.lora_pack import pack_lora_composite
from gatemix.errors import UserError


@pytest.fixture(scope="module")
def lora_folders(tmp_path_factory):
    return write_lora_family(tmp_path_factory.mktemp("lora-pack"))


def _refused(folders, tmp_path, adapters, fragment: str, base="base") -> None:
    out = tmp_path / "composite"
    base_dir = folders.get(base, base)
    with pytest.raises(PackError) as refusal:
        pack_lora_composite(base_dir, adapters, out)
    message = str(refusal.value)
    assert fragment in message and "\n" not in message
    assert not out.exists()


def test_pack_holds_the_base_once_and_each_adapter(lora_folders, tmp_path):
    out = tmp_path / "composite"
    adapters = [lora_folders["attention"], lora_folders["every-linear"]]
    info = pack_lora_composite(lora_folders["base"], adapters, out, gate="attention=0.7,every-linear=0.3")
    assert info.expert_names == ["attention", "every-linear"]
    assert is_lora_composite_folder(out)
    block = json.loads((out / "config.json").read_text())["gatemix"]
    assert block["expert_hidden_sizes"] == [64, 64] and block["lora"]["base_architecture"] == "LlamaForCausalLM"
    base_bytes = sum(p.stat().st_size for p in lora_folders["base"].glob("*.safetensors"))
    assert sum(p.stat().st_size for p in out.glob("*.safetensors")) == base_bytes
    for index in range(2):
        assert (adapter_dir(out, index) / "adapter_model.safetensors").is_file()
    assert len(set(info.expert_hashes.values())) == 2


def test_the_base_defaults_to_the_local_folder_the_adapters_name(lora_folders, tmp_path):
    info = pack_lora_composite(None, [lora_folders["attention"]], tmp_path / "composite")
    assert info.expert_names == ["attention"]


def test_an_adapter_of_another_base_is_refused_by_its_weights(lora_folders, tmp_path):
    _refused(lora_folders, tmp_path, [lora_folders["attention"], lora_folders["of-other"]], "whose weights differ")


def test_an_adapter_of_an_unknown_base_is_checked_by_shape(lora_folders, tmp_path):
    narrow_base = write_random_expert(tmp_path / "narrow", "llama", ExpertShape(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=1, head_dim=32,
        vocab_size=48), seed=5)
    narrow = write_random_lora_adapter(tmp_path / "narrow-adapter", narrow_base, seed=6)
    from_hub = copy_adapter(narrow, tmp_path / "from-hub", base_model_name_or_path="someorg/some-model")
    _refused(lora_folders, tmp_path, [from_hub], "the adapter is of another base")
    same_shapes = copy_adapter(lora_folders["attention"], tmp_path / "hub-same",
                                    base_model_name_or_path="someorg/some-model")
    assert pack_lora_composite(lora_folders["base"], [same_shapes], tmp_path / "ok").expert_names == ["hub-same"]


def test_a_missing_base_is_refused(lora_folders, tmp_path):
    _refused(lora_folders, tmp_path, [lora_folders["attention"]], "does not exist", base=tmp_path / "nope")


def test_target_modules_the_architecture_lacks_are_refused(lora_folders, tmp_path):
    gpt2_targets = copy_adapter(lora_folders["attention"], tmp_path / "gpt2", target_modules=["c_attn"])
    _refused(lora_folders, tmp_path, [gpt2_targets], "target modules ['c_attn'] are not among")
    head = copy_adapter(lora_folders["attention"], tmp_path / "head", target_modules=["q_proj", "lm_head"])
    _refused(lora_folders, tmp_path, [head], "target modules ['lm_head'] are not among")


def test_adapter_types_other_than_lora_are_refused(lora_folders, tmp_path):
    from peft import IA3Config, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(lora_folders["base"]))
    ia3 = get_peft_model(base, IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                         feedforward_modules=["down_proj"]))
    ia3.save_pretrained(str(tmp_path / "ia3"))
    _refused(lora_folders, tmp_path, [tmp_path / "ia3"], "adapter type 'IA3'; only LoRA adapters")
    dora = copy_adapter(lora_folders["attention"], tmp_path / "dora", use_dora=True)
    _refused(lora_folders, tmp_path, [dora], "LoRA options ['use_dora'] are not supported")


def test_a_folder_without_an_adapter_config_is_refused(lora_folders, tmp_path):
    _refused(lora_folders, tmp_path, [lora_folders["base"]], "not a PEFT adapter folder")


def test_the_cli_packs_with_base_and_refuses_in_one_line(lora_folders, tmp_path):
    out = tmp_path / "composite"
    result = run_gatemix("pack", "--base", str(lora_folders["base"]), str(lora_folders["attention"]),
                         str(lora_folders["every-linear"]), "--gate", "0.5,0.5", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert CompositeInfo.read(out).expert_names == ["attention", "every-linear"]
    refused = run_gatemix("pack", "--base", str(tmp_path / "nope"), str(lora_folders["attention"]),
                          "--out", str(tmp_path / "other"))
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr


def test_tensor_parallelism_is_refused_for_lora_experts_in_one_line(lora_folders, tmp_path):
    out = tmp_path / "composite"
    pack_lora_composite(lora_folders["base"], [lora_folders["attention"]], out)
    with pytest.raises(UserError, match="tensor and pipeline parallel size 1"):
        check_engine_settings(out, EngineSettings(tensor_parallel_size=2))
