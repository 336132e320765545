"""``gatemix bench engine``: decode speed of the fused ensemble against its peers.

Three systems, measured one after another in one process on the same prompts:

* the fused ensemble: the composite model in vLLM (K experts, one engine);
* one expert alone in the same vLLM;
* a naive step-by-step ensemble written with ``transformers``: each step runs
  every expert on the last token (with its KV cache) and mixes the
  distributions, the baseline a user would write without gatemix.

Efficiency ``E = K * tps(ensemble) / tps(single)`` is 1 when K experts cost
exactly K times one expert, i.e. when mixing and gating add nothing.

The experts are a project's, or K random-init ones of any shape
(``RandomExpertsConfig`` in :mod:`gatemix.bench.models`, written once by
:mod:`gatemix.bench.random_experts` and packed with a uniform gate): on the tiny demo the per-step overheads
dominate, on experts of real size the compute does, and E should be measured
at both.

The fused ensemble also runs once with the mixing step compiled
(``EngineSettings.compile_mixing``), so that optimisation's before/after figures
come from the same run. Two figures are ratios of paired rounds
(``engine_timing.paired_runs``: both engines alive, timed alternately): a
posterior gate (Bayes posterior) against a uniform one over the same experts,
which is what the per-request state costs, and the ensemble behind a draft
against the ensemble alone. Each system's decode-alone tokens/s sits beside its
whole-request figure, since a posterior gate's extra cost is at prefill.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import time
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from gatemix.bench.engine_timing import (
    TimedRun,
    best_run,
    best_runs,
    paired_runs,
    random_prompts,
    random_requests,
    timed_run,
)
from gatemix.bench.models import (
    BenchModels,
    RandomExpertsConfig,
    posterior_composite,
    uniform_composite,
)
from gatemix.config_cli import field_help
from gatemix.defaults import DEFAULT_PROJECT_DIR
from gatemix.engine.engine_config import (
    EngineSettings,
    engine_kwargs,
    stopping,
)
from gatemix.expert_models import load_expert_models
from gatemix.server.choices import DraftAcceptance

logger = logging.getLogger(__name__)

ENGINE_DTYPES = typing.get_args(EngineSettings.model_fields["dtype"].annotation)


@dataclass
class EngineBenchConfig:
    project: str = field(
        default=DEFAULT_PROJECT_DIR,
        **field_help("project file, or a folder holding gatemix.toml: the experts, in order"))
    composite: str | None = field(
        default=None,
        **field_help("composite folder of the project's experts (None: the project's, packed when "
                "missing or stale)"))
    expert: str | None = field(
        default=None, **field_help("the single-expert baseline's folder (None: the first expert)"))
    concurrency: tuple[int, ...] = field(
        default=(1, 16), **field_help("sequences decoded at once, one point each (e.g. 1 16)"))
    prompt_len: int = field(default=32, **field_help("prompt tokens per sequence"))
    output_len: int = field(default=128, **field_help("generated tokens per sequence (EOS ignored)"))
    dtype: str = field(default="float32", **field_help(f"engine dtype: {', '.join(ENGINE_DTYPES)}", choices=ENGINE_DTYPES))
    enforce_eager: bool | None = field(
        default=None,
        **field_help("vLLM eager mode (None: the engine's default, eager on CPU, compiled with CUDA "
                "graphs on GPU)"))
    compiled_mixing: bool = field(
        default=True, **field_help("also run the ensemble with its mixing step compiled"))
    posterior_state: bool = field(
        default=True,
        **field_help("also run the experts under a posterior gate (the per-request state of the prefix "
                "likelihood) and under a uniform gate, side by side in paired rounds: what the state costs"))
    draft: str | None = field(
        default=None,
        **field_help("also run the ensemble behind this draft model (vLLM's speculative decoding; greedy, "
                "so exact), e.g. the distilled student"))
    num_draft_tokens: int = field(default=3, **field_help("tokens the draft proposes per step"))
    naive_max_concurrency: int = field(
        default=16, **field_help("run the slow naive transformers loop up to this concurrency (0: never)"))
    repeats: int = field(default=2, **field_help("timed repeats per point; the best is kept"))
    json: str | None = field(default=None, **field_help("also write the results here"))
    random: RandomExpertsConfig = field(
        default_factory=RandomExpertsConfig, **field_help("random-init experts instead of the project's"))

    def __post_init__(self) -> None:
        if not self.concurrency or min(self.concurrency) < 1:
            raise ValueError(f"concurrency takes positive integers, got {self.concurrency}")
        if self.prompt_len < 1 or self.output_len < 1 or self.repeats < 1:
            raise ValueError("prompt_len, output_len and repeats must be positive")
        if self.naive_max_concurrency < 0:
            raise ValueError("naive_max_concurrency must be >= 0")
        if self.dtype not in ENGINE_DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(ENGINE_DTYPES)}, got {self.dtype!r}")
        if self.random.random_experts and (self.composite or self.expert):
            raise ValueError("random_experts writes its own composite and experts; give no "
                             "composite or expert with it")

    @property
    def max_model_len(self) -> int:
        return self.prompt_len + self.output_len + 16


def parameter_count(model_dir: str | Path) -> int:
    """Parameters in a folder's safetensors files (tied weights are stored, and counted, once)."""
    total = 0
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            names = handle.keys()
            total += sum(math.prod(handle.get_slice(name).get_shape()) for name in names)
    return total


# ---- the three systems ----

def _vllm_tokens_per_second(
    model_dir: str, settings: EngineSettings, config: EngineBenchConfig, vocab_size: int
) -> dict[int, TimedRun]:
    """``best_run`` of the repeats per concurrency (whole-request and decode-alone tokens/s)."""
    # vllm: deferred, `gatemix bench --help` imports this module for its config
    from vllm import LLM, SamplingParams

    params = SamplingParams(max_tokens=config.output_len, temperature=0.0, ignore_eos=True)
    results = {}
    with stopping(LLM(**engine_kwargs(model_dir, settings), disable_log_stats=False)) as llm:
        llm.generate(_requests(vocab_size, 2, config), params, use_tqdm=False)  # warm-up
        for concurrency in config.concurrency:
            requests = _requests(vocab_size, concurrency, config)
            results[concurrency] = best_run([timed_run(llm, requests, params) for _ in range(config.repeats)])
    return results


def _requests(vocab_size: int, count: int, config: EngineBenchConfig) -> list[dict]:
    return random_requests(vocab_size, count, config.prompt_len)


def _paired_engines(baseline: tuple[str, EngineSettings], candidate: tuple[str, EngineSettings],
                    config: EngineBenchConfig, vocab_size: int, after=None) -> dict:
    """Both engines alive side by side, timed alternately (``engine_timing.paired_runs``), so that a
    drift of the machine moves both; ``after(candidate_llm)`` adds its figures (the draft's acceptance)."""
    from vllm import LLM, SamplingParams  # vllm: deferred, as above

    params = SamplingParams(max_tokens=config.output_len, temperature=0.0, ignore_eos=True)
    with stopping(LLM(**engine_kwargs(*baseline), disable_log_stats=False)) as first, \
            stopping(LLM(**engine_kwargs(*candidate), disable_log_stats=False)) as second:
        for llm in (first, second):
            llm.generate(_requests(vocab_size, 2, config), params, use_tqdm=False)  # warm-up
        paired = paired_runs(first, second, lambda count: _requests(vocab_size, count, config), params,
                             config.concurrency, config.repeats)
        return {"paired": paired, **(after(second) if after is not None else {})}


def _acceptance(llm) -> dict:
    """vLLM's speculative counters over the whole run: acceptance rate and mean acceptance length."""
    counters = {metric.name: getattr(metric, "value", 0) for metric in llm.get_metrics()}
    return DraftAcceptance.from_counters(counters).figures()


def _compiled_mixing_tokens_per_second(
    model_dir: str, settings: EngineSettings, config: EngineBenchConfig, vocab_size: int
) -> dict[int, TimedRun]:
    compiled = settings.model_copy(update={"compile_mixing": True})
    return _vllm_tokens_per_second(model_dir, compiled, config, vocab_size)


@torch.no_grad()
def naive_ensemble_decode(experts, log_weights: torch.Tensor, prompts: list[list[int]], steps: int) -> torch.Tensor:
    """Greedy decode of the mixture, one transformers call per expert per token. -> (B, steps)."""
    device = log_weights.device
    input_ids = torch.tensor(prompts, device=device)
    caches = [None] * len(experts)
    generated = []
    for _ in range(steps):
        logprobs = []
        for k, expert in enumerate(experts):
            out = expert(input_ids, past_key_values=caches[k], use_cache=True)
            caches[k] = out.past_key_values
            logprobs.append(torch.log_softmax(out.logits[:, -1].float(), -1))  # (B, V)
        # (B, K, V) + (1, K, 1) -> (B, V)
        mixture = torch.logsumexp(torch.stack(logprobs, 1) + log_weights[None, :, None], dim=1)
        input_ids = mixture.argmax(-1, keepdim=True)
        generated.append(input_ids)
    return torch.cat(generated, dim=1)


def _naive_tokens_per_second(config: EngineBenchConfig, models: BenchModels, vocab_size: int) -> dict[int, TimedRun]:
    concurrencies = [c for c in config.concurrency if c <= config.naive_max_concurrency]
    if not concurrencies:
        return {}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = "auto" if config.dtype == "auto" else getattr(torch, config.dtype)
    experts = load_expert_models(models.expert_dirs, base=models.base_dir, device=device, dtype=dtype)
    log_weights = torch.full((len(experts),), -math.log(len(experts)), device=device)
    results = {}
    for concurrency in concurrencies:
        prompts = random_prompts(vocab_size, concurrency, config.prompt_len)
        naive_ensemble_decode(experts, log_weights, prompts, 2)  # warm-up
        start = time.perf_counter()
        tokens = naive_ensemble_decode(experts, log_weights, prompts, config.output_len)
        if device == "cuda":
            torch.cuda.synchronize()
        results[concurrency] = TimedRun(tokens.numel() / (time.perf_counter() - start), None)
    del experts
    gc.collect()
    return results


def run_engine_bench(config: EngineBenchConfig, models: BenchModels) -> dict:
    """Measure every system; returns ``{system: {concurrency: tokens/s}}`` plus ratios and sizes."""
    composite_config = json.loads((models.composite_dir / "config.json").read_text())
    vocab_size = composite_config["vocab_size"]
    num_experts = len(composite_config["gatemix"]["expert_names"])
    settings = EngineSettings(
        dtype=config.dtype, max_model_len=config.max_model_len,
        max_num_seqs=max(config.concurrency), enforce_eager=config.enforce_eager,
    )
    composite, single = str(models.composite_dir), str(models.single_dir)
    runs = {"fused ensemble": _vllm_tokens_per_second(composite, settings, config, vocab_size)}
    if config.compiled_mixing:
        runs["fused ensemble, compiled mixing"] = _compiled_mixing_tokens_per_second(
            composite, settings, config, vocab_size)
    posterior = {}
    if config.posterior_state:  # the state's cost: the same experts under a uniform gate, side by side
        posterior = _paired_engines((str(uniform_composite(models)), settings),
                                    (str(posterior_composite(models)), settings), config, vocab_size)
        runs["fused ensemble, uniform gate"] = best_runs(posterior["paired"], "baseline")
        runs["fused ensemble, posterior gate"] = best_runs(posterior["paired"], "candidate")
    speculative = {}
    if config.draft is not None:
        drafted = settings.model_copy(update={"draft": config.draft, "num_draft_tokens": config.num_draft_tokens})
        speculative = _paired_engines((composite, settings), (composite, drafted), config, vocab_size,
                                      after=_acceptance)
        runs["fused ensemble, draft"] = best_runs(speculative["paired"], "candidate")
    runs["single expert (vLLM)"] = _vllm_tokens_per_second(single, settings, config, vocab_size)
    runs["naive transformers ensemble"] = _naive_tokens_per_second(config, models, vocab_size)
    tps = {system: {c: run.tokens_per_second for c, run in by_c.items()} for system, by_c in runs.items()}
    return {
        "num_experts": num_experts,
        "expert_parameters": [parameter_count(folder) for folder in models.expert_dirs],  # an adapter's own
        "base_parameters": parameter_count(models.base_dir) if models.base_dir is not None else None,
        "single_parameters": parameter_count(models.single_dir),
        "models": models.describe(),
        "config": {**asdict(config), "random": asdict(config.random) if config.random.random_experts else None},
        "tokens_per_second": tps,
        "decode_tokens_per_second": {system: {c: run.decode_tokens_per_second for c, run in by_c.items()}
                                     for system, by_c in runs.items()},
        "ratios": _ratios(tps, config.concurrency, num_experts, posterior.get("paired", {}),
                          speculative.get("paired", {})),
        "posterior_state": posterior or None,
        "speculative": speculative or None,
    }


def _ratios(tps: dict[str, dict[int, float]], concurrencies, num_experts: int,
            paired_posterior: dict[int, dict], paired_draft: dict[int, dict]) -> dict[int, dict]:
    """Per concurrency; the posterior and draft figures are medians of paired rounds, not the table's rows."""
    ratios = {}
    for concurrency in concurrencies:
        ensemble, single = tps["fused ensemble"][concurrency], tps["single expert (vLLM)"][concurrency]
        naive = tps["naive transformers ensemble"].get(concurrency)
        compiled = tps.get("fused ensemble, compiled mixing", {}).get(concurrency)
        posterior, drafted = paired_posterior.get(concurrency), paired_draft.get(concurrency)
        ratios[concurrency] = {
            "efficiency_E": num_experts * ensemble / single,
            "speedup_over_naive": ensemble / naive if naive else None,
            "compiled_mixing_speedup": compiled / ensemble if compiled else None,
            "posterior_state_throughput": posterior["ratio"] if posterior else None,
            "posterior_state_decode_throughput": posterior["decode_ratio"] if posterior else None,
            "draft_speedup": drafted["ratio"] if drafted else None,
        }
    return ratios


def _millions(count: int) -> str:
    return f"{count / 1e6:.2f}M" if count < 1e9 else f"{count / 1e9:.2f}B"


def _sizes_line(result: dict) -> str:
    sizes = result["expert_parameters"]
    experts = (f"{len(sizes)} x {_millions(sizes[0])}" if len(set(sizes)) == 1
               else " + ".join(_millions(size) for size in sizes))
    single = f"single expert {_millions(result['single_parameters'])}"
    base = result.get("base_parameters")
    if base is not None:  # LoRA experts: the base once, each adapter's own factors
        return (f"parameters: base {_millions(base)} + adapters {experts} (total {_millions(base + sum(sizes))}); "
                f"{single} (the base)")
    return f"expert parameters: {experts} (total {_millions(sum(sizes))}); {single}"


def _tps_cell(tps: float | None, decode: float | None) -> str:
    if tps is None:
        return "n/a"
    return f"{tps:.1f}" + (f" (decode {decode:.1f})" if decode else "")


def _posterior_cell(paired: dict) -> str:
    rounds = ", ".join(f"{r:.2f}" for r in paired["ratios"])
    cell = f"; posterior / uniform gate: {paired['ratio']:.3f}x (median of rounds {rounds})"
    if paired["decode_ratio"] is not None:
        cell += f", decode alone {paired['decode_ratio']:.3f}x"
    return cell


def format_engine_bench(result: dict, config: EngineBenchConfig) -> str:
    concurrencies = list(config.concurrency)
    random = config.random
    source = (f"{random.random_experts} random {random.random_architecture} experts" if random.random_experts
              else f"project {config.project}")
    lines = [
        (f"decode tokens/s, prompt {config.prompt_len} + output {config.output_len} tokens, "
         f"K = {result['num_experts']} experts ({source}), dtype {config.dtype}"),
        _sizes_line(result),
        "",
        "tokens/s of whole requests (decode alone: each request's tokens after its first, vLLM's timestamps)",
        "",
        "| system | " + " | ".join(f"c={c}" for c in concurrencies) + " |",
        "|---|" + "---|" * len(concurrencies),
    ]
    for system, by_concurrency in result["tokens_per_second"].items():
        decode = result["decode_tokens_per_second"][system]
        cells = [_tps_cell(by_concurrency.get(c), decode.get(c)) for c in concurrencies]
        lines.append(f"| {system} | " + " | ".join(cells) + " |")
    lines.append("")
    for c in concurrencies:
        ratio = result["ratios"][c]
        speedup = f"{ratio['speedup_over_naive']:.1f}x" if ratio["speedup_over_naive"] else "n/a"
        line = (f"c={c}: E = K*tps(ensemble)/tps(single) = {ratio['efficiency_E']:.3f}; "
                f"fused vs naive: {speedup}")
        if ratio["compiled_mixing_speedup"] is not None:
            line += f"; compiled vs eager mixing: {ratio['compiled_mixing_speedup']:.2f}x"
        if ratio["posterior_state_throughput"] is not None:
            line += _posterior_cell(result["posterior_state"]["paired"][c])
        if ratio.get("draft_speedup") is not None:
            rounds = ", ".join(f"{r:.2f}" for r in result["speculative"]["paired"][c]["ratios"])
            line += f"; behind the draft: {ratio['draft_speedup']:.2f}x (median of rounds {rounds})"
        lines.append(line)
    if result.get("speculative"):
        spec = result["speculative"]
        lines.append(f"draft {config.draft}, N = {config.num_draft_tokens}: acceptance rate "
                     f"{spec['acceptance_rate']:.3f}, mean acceptance length {spec['mean_acceptance_length']:.2f}")
    return "\n".join(lines)
