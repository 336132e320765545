"""``gatemix bench engine``: every system on real vLLM, random experts cached, one-line refusals."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from gatemix.bench.models import RandomExpertsConfig, project_models, random_models
from gatemix.cli import main

# Hidden 64, 2 layers, 2 heads and 1 KV head of size 32 (the CPU attention backend needs >= 32).
TINY_SHAPE = {
    "random_hidden_size": 64, "random_layers": 2, "random_heads": 2, "random_kv_heads": 1,
    "random_head_dim": 32, "random_intermediate_size": 128, "random_vocab_size": 512,
    "random_max_position_embeddings": 256,
}
TINY_SHAPE_FLAGS = [item for name, value in TINY_SHAPE.items()
                    for item in ("--" + name.replace("_", "-"), str(value))]
# The compiled-mixing and posterior-gate systems are the fused one's engine with another setting or
# gate, each an engine start: their engines are run for exactness in tests/engine, not here.
SYSTEMS = ("fused ensemble", "single expert (vLLM)", "naive transformers ensemble")


def _tiny_random(cache_dir, **overrides) -> RandomExpertsConfig:
    return RandomExpertsConfig(**{**TINY_SHAPE, "random_experts": 2,
                                  "random_cache_dir": str(cache_dir), **overrides})


@pytest.mark.slow
def test_engine_bench_measures_every_system_on_tiny_random_experts(tmp_path, capsys):
    out = tmp_path / "engine.json"
    status = main(["bench", "engine", "--random-experts", "2", *TINY_SHAPE_FLAGS,
                   "--random-cache-dir", str(tmp_path / "cache"), "--concurrency", "1", "2",
                   "--output-len", "8", "--repeats", "1", "--no-compiled-mixing", "--no-posterior-state",
                   "--json", str(out)])
    assert status == 0
    result = json.loads(out.read_text())
    assert set(result["tokens_per_second"]) == set(SYSTEMS)
    for system in SYSTEMS:
        by_concurrency = result["tokens_per_second"][system]
        assert set(by_concurrency) == {"1", "2"}, system
        assert all(tps > 0 for tps in by_concurrency.values()), (system, by_concurrency)
    for system in ("fused ensemble", "single expert (vLLM)"):  # vLLM's timestamps: decode alone
        decode = result["decode_tokens_per_second"][system]
        assert all(math.isfinite(tps) and tps > 0 for tps in decode.values()), (system, decode)
    for ratio in result["ratios"].values():
        assert math.isfinite(ratio["efficiency_E"]) and ratio["efficiency_E"] > 0
    assert result["num_experts"] == 2 and min(result["expert_parameters"]) > 0
    report = capsys.readouterr().out
    assert "2 random llama experts" in report and "expert parameters: 2 x" in report
    assert "c=2: E = K*tps(ensemble)/tps(single) = " in report and "(decode " in report
    print(report)


def test_random_experts_of_one_shape_are_written_once_and_reused(tmp_path, monkeypatch):
    from gatemix.bench import random_experts
    from gatemix.engine import pack

    first = random_models(_tiny_random(tmp_path))
    stamps = {path: path.stat().st_mtime_ns for path in first.composite_dir.parent.rglob("*")
              if path.is_file()}

    def refuse(*args, **kwargs):
        raise AssertionError("written again")

    monkeypatch.setattr(random_experts, "write_random_expert", refuse)
    monkeypatch.setattr(pack, "pack_composite", refuse)
    again = random_models(_tiny_random(tmp_path))
    assert again == first
    assert {path: path.stat().st_mtime_ns for path in stamps} == stamps
    monkeypatch.undo()
    other = random_models(_tiny_random(tmp_path, random_layers=1))
    assert other.composite_dir.parent != first.composite_dir.parent  # another shape, another folder


def test_the_posterior_system_is_the_same_experts_behind_a_bayes_posterior_gate(tmp_path):
    """And its baseline the same experts behind a uniform gate, whatever gate the project serves."""
    import torch

    from gatemix.bench.models import posterior_composite, uniform_composite
    from gatemix.engine.composite_folder import GATE_SUBDIR, CompositeInfo
    from gatemix.gate.artifact import load_router

    models = random_models(_tiny_random(tmp_path))
    out = posterior_composite(models)
    router = load_router(out / GATE_SUBDIR).router
    assert router.form.posterior
    assert not router.proj_out.weight.any() and not router.proj_out.bias.any()  # uniform prior, zero head
    assert CompositeInfo.read(out).expert_hashes == CompositeInfo.read(models.composite_dir).expert_hashes
    uniform = uniform_composite(models)
    router = load_router(uniform / GATE_SUBDIR).router
    assert not router.form.posterior
    weights = router.gate(torch.randn(5, sum(router.form.expert_widths))).exp()  # (5, K) whatever the input
    torch.testing.assert_close(weights, torch.full((5, 2), 0.5))
    assert CompositeInfo.read(uniform).expert_hashes == CompositeInfo.read(models.composite_dir).expert_hashes


def test_the_posterior_system_of_lora_experts_is_a_lora_composite(tmp_path):
    from lora_builders import write_lora_family

    from gatemix.bench.models import BenchModels, posterior_composite
    from gatemix.engine.composite_folder import GATE_SUBDIR, CompositeInfo, is_lora_composite_folder
    from gatemix.engine.lora_pack import pack_lora_composite
    from gatemix.gate.artifact import load_router

    family = write_lora_family(tmp_path / "family")
    adapters = [family["attention"], family["every-linear"]]
    composite = pack_lora_composite(family["base"], adapters, tmp_path / "composite", gate="uniform").path
    models = BenchModels(composite_dir=composite, expert_dirs=adapters, single_dir=family["base"],
                         base_dir=family["base"])
    out = posterior_composite(models)
    assert is_lora_composite_folder(out) and load_router(out / GATE_SUBDIR).router.form.posterior
    assert CompositeInfo.read(out).expert_hashes == CompositeInfo.read(composite).expert_hashes


def test_engine_bench_refuses_a_folder_without_a_project_file(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "gatemix.cli", "bench", "engine", "--project", str(tmp_path)],
        capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no project file" in lines[0], result.stderr


def test_project_models_are_its_experts_its_composite_and_its_first_expert(tiny_project):
    project, models = project_models(str(tiny_project))
    assert models.expert_dirs == list(project.experts.values())
    assert models.single_dir == models.expert_dirs[0]
    assert models.composite_dir == project.composite_dir
    assert json.loads((models.composite_dir / "config.json").read_text())["gatemix"][
        "expert_names"] == ["code", "legal"]


def test_the_sizes_line_counts_a_lora_base_once_and_each_adapter_s_own_factors():
    from gatemix.bench.engine_bench import _sizes_line

    lora = {"expert_parameters": [20_000, 20_000, 20_000], "base_parameters": 12_000_000,
            "single_parameters": 12_000_000}
    assert _sizes_line(lora) == ("parameters: base 12.00M + adapters 3 x 0.02M (total 12.06M); "
                                 "single expert 12.00M (the base)")
    full = {"expert_parameters": [1_000_000, 2_000_000], "base_parameters": None, "single_parameters": 1_000_000}
    assert _sizes_line(full) == "expert parameters: 1.00M + 2.00M (total 3.00M); single expert 1.00M"
