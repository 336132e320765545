"""``gatemix bench engine``: decode speed of the fused ensemble against its peers.

Three systems, measured one after another in one process on the same prompts:

* the fused ensemble: the composite model in vLLM (K experts, one engine);
* one expert alone in the same vLLM;
* a naive step-by-step ensemble written with ``transformers``: each step runs
  every expert on the last token (with its KV cache) and mixes the
  distributions, the baseline a user would write without gatemix.

Efficiency ``E = K * tps(ensemble) / tps(single)`` is 1 when K experts cost
exactly K times one expert, i.e. when mixing and gating add nothing.

The fused ensemble also runs once with the mixing step compiled
(``GATEMIX_COMPILE_MIXING=1``), so that optimisation's before/after figures
come from the same run.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gatemix.engine.composite_folder import CompositeInfo
from gatemix.engine.engine_config import EngineSettings, build_offline_engine

logger = logging.getLogger(__name__)


@dataclass
class EngineBenchConfig:
    composite_dir: str = field(metadata={"help": "composite folder (gatemix pack output)"})
    expert_dir: str = field(metadata={"help": "one expert's folder, for the single-model baseline"})
    concurrencies: tuple[int, ...] = field(default=(1, 16), metadata={"help": "sequences decoded at once"})
    prompt_len: int = field(default=32, metadata={"help": "prompt tokens per sequence"})
    output_len: int = field(default=128, metadata={"help": "generated tokens per sequence"})
    dtype: str = field(default="float32", metadata={"help": "engine dtype"})
    naive_max_concurrency: int = field(default=16, metadata={"help": "skip the slow naive loop above this"})
    enforce_eager: bool = field(default=True, metadata={"help": "vLLM eager mode (no torch.compile)"})
    repeats: int = field(default=2, metadata={"help": "timed repeats per point; the best is kept"})

    def __post_init__(self) -> None:
        if self.prompt_len < 1 or self.output_len < 1 or min(self.concurrencies) < 1 or self.repeats < 1:
            raise ValueError("prompt_len, output_len, concurrencies and repeats must be positive")


def _prompts(vocab_size: int, count: int, length: int, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    # Skip the first ids (special tokens) so no prompt starts with an EOS.
    return torch.randint(16, vocab_size, (count, length), generator=generator).tolist()


def _vllm_tokens_per_second(
    model_dir: str, settings: EngineSettings, config: EngineBenchConfig, vocab_size: int
) -> dict[int, float]:
    from vllm import SamplingParams

    llm = build_offline_engine(model_dir, settings)
    params = SamplingParams(max_tokens=config.output_len, temperature=0.0, ignore_eos=True)
    results = {}
    try:
        llm.generate([{"prompt_token_ids": p} for p in _prompts(vocab_size, 2, config.prompt_len)], params, use_tqdm=False)
        for concurrency in config.concurrencies:
            requests = [{"prompt_token_ids": p} for p in _prompts(vocab_size, concurrency, config.prompt_len)]
            best = 0.0
            for _ in range(config.repeats):
                start = time.perf_counter()
                outputs = llm.generate(requests, params, use_tqdm=False)
                elapsed = time.perf_counter() - start
                best = max(best, sum(len(o.outputs[0].token_ids) for o in outputs) / elapsed)
            results[concurrency] = best
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    return results


@torch.no_grad()
def naive_ensemble_decode(experts, log_weights: torch.Tensor, prompts: list[list[int]], steps: int) -> torch.Tensor:
    """Greedy decode of the mixture, one transformers call per expert per token. -> (B, steps)."""
    input_ids = torch.tensor(prompts)
    caches = [None] * len(experts)
    generated = []
    for _ in range(steps):
        logprobs = []
        for k, expert in enumerate(experts):
            out = expert(input_ids, past_key_values=caches[k], use_cache=True)
            caches[k] = out.past_key_values
            logprobs.append(torch.log_softmax(out.logits[:, -1].float(), -1))
        mixture = torch.logsumexp(torch.stack(logprobs, 1) + log_weights[None, :, None], dim=1)
        input_ids = mixture.argmax(-1, keepdim=True)
        generated.append(input_ids)
    return torch.cat(generated, dim=1)


def _naive_tokens_per_second(config: EngineBenchConfig, expert_dirs: list[str], vocab_size: int) -> dict[int, float]:
    from transformers import LlamaForCausalLM

    experts = [LlamaForCausalLM.from_pretrained(d, dtype=torch.float32).eval() for d in expert_dirs]
    log_weights = torch.full((len(experts),), -torch.log(torch.tensor(float(len(experts)))))
    results = {}
    for concurrency in config.concurrencies:
        if concurrency > config.naive_max_concurrency:
            continue
        prompts = _prompts(vocab_size, concurrency, config.prompt_len)
        naive_ensemble_decode(experts, log_weights, prompts, 2)  # warm-up
        start = time.perf_counter()
        tokens = naive_ensemble_decode(experts, log_weights, prompts, config.output_len)
        results[concurrency] = tokens.numel() / (time.perf_counter() - start)
    return results


def run_engine_bench(config: EngineBenchConfig, expert_dirs: list[str]) -> dict:
    """Measure all three systems; returns ``{system: {concurrency: tokens/s}}`` plus ratios."""
    info = CompositeInfo.read(config.composite_dir)
    vocab_size = json.loads((Path(config.composite_dir) / "config.json").read_text())["vocab_size"]
    num_experts = len(info.expert_names)
    max_seqs = max(config.concurrencies)

    settings = EngineSettings(
        dtype=config.dtype, max_model_len=config.prompt_len + config.output_len + 16,
        max_num_seqs=max_seqs, enforce_eager=config.enforce_eager,
    )

    previous = os.environ.get("GATEMIX_COMPILE_MIXING")
    os.environ["GATEMIX_COMPILE_MIXING"] = "1"  # read by the engine's worker when it starts
    try:
        compiled_mixing = _vllm_tokens_per_second(config.composite_dir, settings, config, vocab_size)
    finally:
        if previous is None:
            os.environ.pop("GATEMIX_COMPILE_MIXING")
        else:
            os.environ["GATEMIX_COMPILE_MIXING"] = previous
    tps = {
        "fused ensemble": _vllm_tokens_per_second(config.composite_dir, settings, config, vocab_size),
        "fused ensemble, compiled mixing": compiled_mixing,
        "single expert (vLLM)": _vllm_tokens_per_second(config.expert_dir, settings, config, vocab_size),
        "naive transformers ensemble": _naive_tokens_per_second(config, expert_dirs, vocab_size),
    }
    ratios = {}
    for concurrency in config.concurrencies:
        ensemble, single = tps["fused ensemble"][concurrency], tps["single expert (vLLM)"][concurrency]
        naive = tps["naive transformers ensemble"].get(concurrency)
        ratios[concurrency] = {
            "efficiency_E": num_experts * ensemble / single,
            "speedup_over_naive": ensemble / naive if naive else None,
            "compiled_mixing_speedup": tps["fused ensemble, compiled mixing"][concurrency] / ensemble,
        }
    return {"num_experts": num_experts, "tokens_per_second": tps, "ratios": ratios}


def format_engine_bench(result: dict, config: EngineBenchConfig) -> str:
    concurrencies = list(config.concurrencies)
    lines = [
        f"decode tokens/s, prompt {config.prompt_len} + output {config.output_len} tokens, "
        f"K = {result['num_experts']} experts, dtype {config.dtype}",
        "",
        "| system | " + " | ".join(f"c={c}" for c in concurrencies) + " |",
        "|---|" + "---|" * len(concurrencies),
    ]
    for system, by_concurrency in result["tokens_per_second"].items():
        cells = [f"{by_concurrency[c]:.1f}" if c in by_concurrency else "n/a" for c in concurrencies]
        lines.append(f"| {system} | " + " | ".join(cells) + " |")
    lines.append("")
    for c in concurrencies:
        ratio = result["ratios"][c]
        speedup = f"{ratio['speedup_over_naive']:.1f}x" if ratio["speedup_over_naive"] else "n/a"
        lines.append(
            f"c={c}: E = K*tps(ensemble)/tps(single) = {ratio['efficiency_E']:.3f}; fused vs naive: {speedup}; "
            f"compiled vs eager mixing: {ratio['compiled_mixing_speedup']:.2f}x"
        )
    return "\n".join(lines)
