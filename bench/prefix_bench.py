"""``gatemix bench prefix``: time to first token on traffic that shares a long prompt prefix.

Chat clients resend the same system prompt, conversations resend their
earlier turns: most of a prompt is often a prefix vLLM has cached. This bench
sends ``requests`` prompts made of one shared prefix and a distinct tail,
``concurrency`` at a time (closed loop, one ``generate`` call per wave), and
reports vLLM's own per-request time to first token for four systems. All four
engines are started first; then each round runs every system's waves in turn
(fresh tails, the same prefix), so that the machine's drift falls on all of
them alike, and the median of the rounds' means is reported:

* the posterior composite (the gate that reads each expert's likelihood of the
  prefix), prefix caching on;
* the same, caching off (what gatemix served before its state was cached);
* a hidden-state-router composite of the same experts (no per-request state), caching on;
* one expert alone in the same vLLM, caching on.
"""

from __future__ import annotations

import gc
import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

from gatemix.bench.models import (
    BenchModels,
    RandomExpertsConfig,
    hidden_router_composite,
    posterior_composite,
)
from gatemix.config_cli import field_help
from gatemix.defaults import DEFAULT_PROJECT_DIR
from gatemix.engine.composite_folder import GATE_SUBDIR
from gatemix.engine.engine_config import EngineSettings, engine_kwargs, shutdown_offline_engine
from gatemix.gate.artifact import read_router_form


@dataclass
class PrefixBenchConfig:
    project: str = field(default=DEFAULT_PROJECT_DIR, **field_help("project file or folder: the experts"))
    prefix_len: int = field(default=900, **field_help("tokens of the prefix every prompt shares"))
    tail_len: int = field(default=16, **field_help("tokens of each prompt's own tail"))
    output_len: int = field(default=8, **field_help("generated tokens per request"))
    requests: int = field(default=32, **field_help("requests per system and round"))
    rounds: int = field(default=3, **field_help("rounds over all systems; the median round is reported"))
    concurrency: int = field(default=4, **field_help("requests in flight at once (one wave)"))
    dtype: str = field(default="float32", **field_help("engine dtype"))
    json: str | None = field(default=None, **field_help("also write the results here"))
    random: RandomExpertsConfig = field(
        default_factory=RandomExpertsConfig, **field_help("random-init experts instead of the project's"))

    def __post_init__(self) -> None:
        if min(self.prefix_len, self.tail_len, self.output_len, self.requests, self.concurrency, self.rounds) < 1:
            raise ValueError("prefix_len, tail_len, output_len, requests, concurrency and rounds must be positive")


def shared_prefix_prompts(vocab_size: int, config: PrefixBenchConfig, seed: int = 0) -> list[list[list[int]]]:
    """One list of prompts per round: the same prefix throughout, fresh tails each round."""
    import torch  # torch: deferred, `gatemix bench --help` imports this module for its config

    generator = torch.Generator().manual_seed(seed)
    prefix = torch.randint(16, vocab_size, (config.prefix_len,), generator=generator).tolist()
    rounds = []
    for _ in range(config.rounds):
        tails = torch.randint(16, vocab_size, (config.requests, config.tail_len), generator=generator).tolist()
        rounds.append([prefix + tail for tail in tails])
    return rounds


def start_engine(model_dir: Path, config: PrefixBenchConfig, caching: bool):
    # vllm: deferred, as above
    from vllm import LLM, SamplingParams

    settings = EngineSettings(
        dtype=config.dtype, max_model_len=config.prefix_len + config.tail_len + config.output_len + 16,
        max_num_seqs=config.concurrency, enable_prefix_caching=caching, kv_cache_gib=1,
    )
    llm = LLM(**engine_kwargs(model_dir, settings), disable_log_stats=False)
    llm.generate([{"prompt_token_ids": [20, 21, 22]}], SamplingParams(max_tokens=2), use_tqdm=False)  # warm-up
    return llm


def mean_ttft_ms(llm, prompts: list[list[int]], config: PrefixBenchConfig) -> float:
    """Mean of vLLM's per-request time to first token over ``concurrency``-sized waves, in milliseconds."""
    from vllm import SamplingParams  # vllm: deferred, as above

    params = SamplingParams(max_tokens=config.output_len, temperature=0.0, ignore_eos=True)
    latencies = []
    for start in range(0, len(prompts), config.concurrency):
        wave = [{"prompt_token_ids": p} for p in prompts[start : start + config.concurrency]]
        latencies += [out.metrics.first_token_latency for out in llm.generate(wave, params, use_tqdm=False)]
    return 1000 * statistics.fmean(latencies)


def paired_rounds(systems: dict[str, tuple[Path, bool]], rounds: list[list[list[int]]],
                  config: PrefixBenchConfig) -> dict[str, list[float]]:
    """Every system's mean TTFT per round, the systems taking turns within each round."""
    engines = {}
    try:
        for name, (folder, caching) in systems.items():
            engines[name] = start_engine(folder, config, caching)
        results = {name: [] for name in systems}
        for prompts in rounds:
            for name, llm in engines.items():
                results[name].append(mean_ttft_ms(llm, prompts, config))
        return results
    finally:
        for llm in engines.values():
            shutdown_offline_engine(llm)
        engines.clear()
        gc.collect()


def run_prefix_bench(config: PrefixBenchConfig, models: BenchModels) -> dict:
    vocab_size = json.loads((models.composite_dir / "config.json").read_text())["vocab_size"]
    rounds = shared_prefix_prompts(vocab_size, config)
    served_is_posterior = read_router_form(models.composite_dir / GATE_SUBDIR).posterior
    posterior = models.composite_dir if served_is_posterior else posterior_composite(models)
    systems = {
        "posterior composite, caching on": (posterior, True),
        "posterior composite, caching off": (posterior, False),
        "hidden-state-router composite, caching on": (hidden_router_composite(models), True),
        "one expert, caching on": (models.single_dir, True),
    }
    per_round = paired_rounds(systems, rounds, config)
    ttft = {name: statistics.median(values) for name, values in per_round.items()}
    cached = ttft["posterior composite, caching on"]
    return {
        "config": {**asdict(config), "random": asdict(config.random) if config.random.random_experts else None},
        "models": {**models.describe(), "posterior": str(posterior)},
        "mean_ttft_ms": ttft,
        "mean_ttft_ms_per_round": per_round,
        "ratios": {
            "caching_speedup": ttft["posterior composite, caching off"] / cached,
            "vs_hidden_state_router": cached / ttft["hidden-state-router composite, caching on"],
            "vs_one_expert": cached / ttft["one expert, caching on"],
        },
    }


def format_prefix_bench(result: dict) -> str:
    config, ratios = result["config"], result["ratios"]
    lines = [
        (f"mean time to first token: {config['requests']} prompts of a shared {config['prefix_len']}-token "
         f"prefix + {config['tail_len']}-token tails, {config['concurrency']} at a time, {config['output_len']} "
         f"output tokens, dtype {config['dtype']}; median of {config['rounds']} paired rounds"),
        "",
        "| system | mean TTFT (ms) | per round |",
        "|---|---|---|",
        *(f"| {name} | {value:.1f} | {', '.join(f'{v:.1f}' for v in result['mean_ttft_ms_per_round'][name])} |"
          for name, value in result["mean_ttft_ms"].items()),
        "",
        (f"posterior composite: caching on is {ratios['caching_speedup']:.2f}x faster than off; "
         f"{ratios['vs_hidden_state_router']:.2f}x the hidden-state router's TTFT; "
         f"{ratios['vs_one_expert']:.2f}x one expert's"),
    ]
    return "\n".join(lines)
