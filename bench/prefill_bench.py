"""``gatemix bench prefill``: what a posterior gate's state costs a long prompt's prefill, in time and memory.

The posterior state needs each expert's log-prob of every prompt token, so a
posterior composite runs every expert's LM head over the whole prompt (a
uniform or hidden-state gate runs it on the last token only). The engine
gathers those log-probs in bounded row chunks (``engine/prefix_state.py``);
this bench shows what is left, at a large vocabulary where a tokens x K x V
log-softmax would have been gigabytes. Side by side in one run, each on fresh
prompts (no prefix-cache hits), one prompt in one chunk:

* the experts with a uniform gate;
* the same experts with a posterior gate.

Reported: the best prefill time over the repeats, and the engine processes'
peak resident memory above what they held before the prompt arrived (the KV
cache and weights are already resident then).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from gatemix.bench.models import BenchModels, RandomExpertsConfig, posterior_composite
from gatemix.config_cli import field_help
from gatemix.defaults import DEFAULT_PROJECT_DIR
from gatemix.engine.engine_config import (
    EngineSettings,
    build_offline_engine,
    stopping,
)


@dataclass
class PrefillBenchConfig:
    project: str = field(default=DEFAULT_PROJECT_DIR, **field_help("project file or folder: the experts"))
    prompt_len: int = field(default=3000, **field_help("tokens of the one prompt prefilled at a time"))
    repeats: int = field(default=3, **field_help("prompts per system (fresh ones: no cache hits); the best time is kept"))
    dtype: str = field(default="float32", **field_help("engine dtype"))
    json: str | None = field(default=None, **field_help("also write the results here"))
    random: RandomExpertsConfig = field(
        default_factory=RandomExpertsConfig, **field_help("random-init experts instead of the project's"))

    def __post_init__(self) -> None:
        if self.prompt_len < 2 or self.repeats < 1:
            raise ValueError("prompt_len must be >= 2 and repeats >= 1")


def measure_prefill(model_dir: Path, vocab_size: int, config: PrefillBenchConfig) -> dict:
    """Best prefill seconds and peak extra resident MiB of the engine's processes, over fresh prompts."""
    import os

    import torch
    from vllm import SamplingParams  # vllm: deferred, `gatemix bench --help` imports this module

    from gatemix.bench.servers import ProcessUsage

    settings = EngineSettings(
        dtype=config.dtype, max_model_len=config.prompt_len + 16, max_num_seqs=1,
        max_num_batched_tokens=config.prompt_len + 16,
    )
    params = SamplingParams(max_tokens=1, temperature=0.0)
    generator = torch.Generator().manual_seed(1)
    with stopping(build_offline_engine(model_dir, settings)) as llm:
        llm.generate([{"prompt_token_ids": [20, 21, 22]}], params, use_tqdm=False)  # warm-up
        times, extra_mib, peak_mib = [], [], []
        for _ in range(config.repeats):
            prompt = torch.randint(16, vocab_size, (config.prompt_len,), generator=generator).tolist()
            with ProcessUsage([os.getpid()], interval_s=0.05) as usage:
                before = usage.peak_mib
                start = time.perf_counter()
                llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
                times.append(time.perf_counter() - start)
            extra_mib.append(usage.peak_mib - before)
            peak_mib.append(usage.peak_mib)
    return {"prefill_s": min(times), "peak_extra_mib": max(extra_mib), "peak_mib": max(peak_mib)}


def run_prefill_bench(config: PrefillBenchConfig, models: BenchModels) -> dict:
    vocab_size = json.loads((models.composite_dir / "config.json").read_text())["vocab_size"]
    systems = {"uniform gate": models.composite_dir, "posterior gate": posterior_composite(models)}
    results = {name: measure_prefill(folder, vocab_size, config) for name, folder in systems.items()}
    uniform, posterior = results["uniform gate"], results["posterior gate"]
    return {
        "config": {**asdict(config), "random": asdict(config.random) if config.random.random_experts else None},
        "vocab_size": vocab_size,
        "results": results,
        "ratios": {
            "prefill_time": posterior["prefill_s"] / uniform["prefill_s"],
            "peak_extra_memory": posterior["peak_extra_mib"] / max(uniform["peak_extra_mib"], 1.0),
            "peak_memory": posterior["peak_mib"] / uniform["peak_mib"],
        },
    }


def format_prefill_bench(result: dict) -> str:
    config, ratios = result["config"], result["ratios"]
    lines = [
        f"prefill of one {config['prompt_len']}-token prompt, vocabulary {result['vocab_size']}, dtype {config['dtype']}",
        "",
        "| gate | prefill (s) | peak memory of the processes (MiB) | of which above idle |",
        "|---|---|---|---|",
        *(f"| {name} | {r['prefill_s']:.2f} | {r['peak_mib']:.0f} | {r['peak_extra_mib']:.0f} |"
          for name, r in result["results"].items()),
        "",
        (f"posterior / uniform: prefill time {ratios['prefill_time']:.2f}x, peak memory {ratios['peak_memory']:.2f}x "
         f"(above idle {ratios['peak_extra_memory']:.2f}x)"),
    ]
    return "\n".join(lines)
