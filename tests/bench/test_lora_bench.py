"""``gatemix bench lora``: its byte accounting, its merged experts and its report, without an engine.

The bench itself starts two vLLM engines; nothing here does. The tiny models
are written by the bench's own ``prepare_folders`` (a random Llama base, two
random adapters on every linear layer, each merged into a full expert, both
composites packed).
"""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch
from cli_runner import run_gatemix
from safetensors.torch import save_file

from gatemix.bench import lora_bench
from gatemix.bench.lora_bench import (
    LoRABenchConfig,
    decode_read_tensors,
    folder_tensors,
    format_lora_bench,
    lora_ratios,
    parameter_bytes,
    prepare_folders,
    safetensors_header,
    stacked_factor_parameters,
    weight_accounting,
)

# Hidden 64, 2 heads of 32 (the CPU attention's least), 1 KV head, 2 layers.
TINY = {"adapters": 2, "rank": 4, "alpha": 8.0, "hidden_size": 64, "layers": 2, "heads": 2,
        "kv_heads": 1, "intermediate_size": 128, "vocab_size": 512}


def _tensor(shape: list[int]) -> dict:
    return {"dtype": "F32", "shape": shape, "data_offsets": [0, 4 * int(torch.tensor(shape).prod())]}


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory):
    config = LoRABenchConfig(**TINY, cache_dir=str(tmp_path_factory.mktemp("lora-bench")))
    return config, prepare_folders(config)


def test_the_header_gives_each_tensor_s_bytes_as_stored_and_at_the_engine_s_dtype(tmp_path):
    tensors = {"a": torch.zeros(3, 5), "b": torch.zeros(7, dtype=torch.bfloat16),
               "c": torch.zeros(2, 2, dtype=torch.int64)}
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    header = safetensors_header(tmp_path / "model.safetensors")
    assert {name: (t["dtype"], t["shape"]) for name, t in header.items()} == {
        "a": ("F32", [3, 5]), "b": ("BF16", [7]), "c": ("I64", [2, 2])}
    assert parameter_bytes(header) == sum(t.numel() * t.element_size() for t in tensors.values()) == 106
    assert parameter_bytes(header, element_bytes=2) == 2 * (15 + 7 + 4)
    assert folder_tensors(tmp_path) == header


def test_a_decode_step_reads_every_tensor_but_the_input_embeddings_unless_they_are_the_head():
    untied = {name: _tensor([8, 4]) for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight")}
    assert set(decode_read_tensors(untied)) == {"lm_head.weight", "model.norm.weight"}
    tied = {name: _tensor([8, 4]) for name in ("model.embed_tokens.weight", "model.norm.weight")}
    assert set(decode_read_tensors(tied)) == set(tied)
    # A full composite's names carry each expert's prefix; expert 1's head is its embedding.
    composite = {name: _tensor([8, 4]) for name in (
        "experts.0.model.embed_tokens.weight", "experts.0.lm_head.weight", "experts.1.model.embed_tokens.weight")}
    assert set(decode_read_tensors(composite)) == {"experts.0.lm_head.weight", "experts.1.model.embed_tokens.weight"}


def test_the_engine_s_factors_stack_each_projection_s_outputs_and_pad_to_the_largest_rank():
    shapes = {"q_proj": [64, 64], "k_proj": [32, 64], "v_proj": [32, 64], "o_proj": [64, 64],
              "gate_proj": [128, 64], "up_proj": [128, 64], "down_proj": [64, 128]}
    base = {f"model.layers.0.{lora_bench.ADAPTER_MODULES[m]}.weight": _tensor(s) for m, s in shapes.items()}

    def factor(module: str, rank: int) -> tuple[list[int], list[int]]:
        out, inp = shapes[module]
        return [rank, inp], [out, rank]

    adapters = [
        {(0, "q_proj"): factor("q_proj", 4), (0, "v_proj"): factor("v_proj", 4), (0, "down_proj"): factor("down_proj", 2)},
        {(0, "q_proj"): factor("q_proj", 8)},
    ]
    # q/k/v: rank 8 for both (4 + 4 against 8) over in 64 and out 64 + 32 + 32;
    # down: rank 2, padded for expert 1, over in 128 and out 64; o and gate/up: nobody adapts them.
    assert stacked_factor_parameters(base, adapters) == 2 * 8 * (64 + 128) + 2 * 2 * (128 + 64)


@pytest.mark.slow
def test_the_lora_composite_counts_the_base_once_and_the_merged_one_k_experts(tiny_bench):
    config, folders = tiny_bench
    weights = weight_accounting(folders, element_bytes=4)
    expert, lora, merged = (weights[name] for name in ("one expert", "LoRA composite", "merged composite"))
    base_bytes = parameter_bytes(folder_tensors(folders.base))
    assert base_bytes == expert["disk_bytes"]  # a merged expert has the base's shapes and dtype
    assert lora["disk_bytes"] == base_bytes + lora["factor_disk_bytes"] > base_bytes
    adapter_files = sum(parameter_bytes(folder_tensors(adapter)) for adapter in folders.adapters)
    assert lora["factor_disk_bytes"] == adapter_files
    assert merged["disk_bytes"] == merged["engine_bytes"] == config.adapters * expert["disk_bytes"]
    assert merged["read_per_step_bytes"] == config.adapters * expert["read_per_step_bytes"]
    # q/k/v and gate/up stack their outputs under one rank block each: more than the files hold.
    assert lora["factor_engine_bytes"] > lora["factor_disk_bytes"]
    assert lora["read_per_step_bytes"] == expert["read_per_step_bytes"] + lora["factor_engine_bytes"]
    embedding = 4 * config.vocab_size * config.hidden_size
    assert expert["engine_bytes"] - expert["read_per_step_bytes"] == embedding


@pytest.mark.slow
def test_models_are_written_once_and_reused(tiny_bench, monkeypatch):
    config, folders = tiny_bench

    def refuse(*args, **kwargs):
        raise AssertionError("rewrote a model that was already written")

    monkeypatch.setattr(lora_bench, "write_random_lora_adapter", refuse)
    monkeypatch.setattr(lora_bench, "write_merged_expert", refuse)
    assert prepare_folders(config) == folders


@pytest.mark.slow
def test_a_merged_expert_gives_the_logits_of_the_base_with_its_adapter_in_peft(tiny_bench):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, folders = tiny_bench
    token_ids = torch.tensor([[5, 17, 301, 42, 9, 77]])
    for adapter, merged_dir in zip(folders.adapters, folders.merged):
        base = AutoModelForCausalLM.from_pretrained(str(folders.base), dtype=torch.float32)
        reference = PeftModel.from_pretrained(base, str(adapter)).eval()
        merged = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32).eval()
        with torch.no_grad():
            expected, got = reference(token_ids).logits, merged(token_ids).logits
            plain = AutoModelForCausalLM.from_pretrained(str(folders.base), dtype=torch.float32)(token_ids).logits
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        assert (got - plain).abs().max() > 1e-2  # the adapter moved the base
    assert len(AutoTokenizer.from_pretrained(str(folders.merged[0]))) == TINY["vocab_size"]


def _result(tps_ratio: dict[int, float]) -> dict:
    mib = 2**20
    weights = {
        "one expert": {"disk_bytes": 100 * mib, "engine_bytes": 100 * mib, "read_per_step_bytes": 80 * mib},
        "LoRA composite": {"disk_bytes": 110 * mib, "engine_bytes": 125 * mib, "read_per_step_bytes": 105 * mib,
                           "factor_disk_bytes": 10 * mib, "factor_engine_bytes": 25 * mib},
        "merged composite": {"disk_bytes": 400 * mib, "engine_bytes": 400 * mib, "read_per_step_bytes": 320 * mib},
    }
    config = LoRABenchConfig()
    return {
        "config": asdict(config), "weights": weights,
        "tokens_per_second": {"LoRA composite": {c: 10.0 * r for c, r in tps_ratio.items()},
                              "merged composite": dict.fromkeys(tps_ratio, 10.0)},
        "rounds": {c: [r, r] for c, r in tps_ratio.items()}, "ratio": tps_ratio,
        "peak_memory_mib": {"LoRA composite": 1500.0, "merged composite": 3000.0},
        "ratios": lora_ratios(weights, tps_ratio),
    }


def test_the_report_gives_both_systems_their_ratios_and_whether_each_target_is_met():
    report = format_lora_bench(_result({1: 1.25, 16: 0.8}))
    assert "| weights on disk (MiB) | 110.0 (1.10x one expert) | 400.0 (4.00x) | 0.28 |" in report
    assert "| weights in the engine (MiB) | 125.0 (1.25x one expert) | 400.0 (4.00x) | 0.31 |" in report
    assert "| weights read per decode step (MiB, estimate) | 105.0 (1.31x one expert) | 320.0 (4.00x) | 0.33 |" in report
    assert "| peak resident memory of the engine, its 1 GiB KV cache included (MiB) | 1500 | 3000 | 0.50 |" in report
    assert "| decode tokens/s, c=1 (best round) | 12.5 | 10.0 | 1.25 (median of rounds 1.25, 1.25) |" in report
    assert "on disk 1.10x (met), in the engine 1.25x (met) (merged: 4.00x)" in report
    assert "c=1 1.25x (met), c=16 0.80x (not met)" in report
    ratios = _result({1: 1.0})["ratios"]
    assert ratios["read_per_step_lora_over_merged"] == pytest.approx(105 / 320)


@pytest.mark.parametrize("flags, message", [
    (["--rank", "0"], "adapters and rank must be positive"),
    (["--heads", "64"], "head size 16 < 32"),
    (["--hidden-size", "100", "--heads", "3"], "not a multiple of num_attention_heads"),
    (["--prompt-len", "4000"], "exceed the base's context"),
    (["--concurrency", "0"], "concurrency takes positive integers"),
])
def test_bad_flags_are_refused_in_one_line_before_anything_is_written(tmp_path, flags, message):
    result = run_gatemix("bench", "lora", "--cache-dir", str(tmp_path / "cache"), *flags)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert not (tmp_path / "cache").exists()
