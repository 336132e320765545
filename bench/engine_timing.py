"""Timing offline vLLM engines: one generate call, or two engines side by side in paired rounds.

This machine's speed drifts by tens of percent from minute to minute, so a
ratio between two systems is only worth reporting when both were timed in the
same minutes: ``paired_runs`` keeps both engines alive and alternates them on
the same prompts, round by round, and reports every round's ratio and their
median.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch


def random_prompts(vocab_size: int, count: int, length: int, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    # Skip the first ids (special tokens) so no prompt starts with an EOS.
    return torch.randint(16, vocab_size, (count, length), generator=generator).tolist()


def random_requests(vocab_size: int, count: int, length: int) -> list[dict]:
    """``random_prompts`` as offline ``LLM.generate`` requests."""
    return [{"prompt_token_ids": prompt} for prompt in random_prompts(vocab_size, count, length)]


def timed_tps(llm, requests: list[dict], params) -> float:
    return timed_run(llm, requests, params).tokens_per_second


@dataclass(frozen=True)
class TimedRun:
    tokens_per_second: float  # whole requests: generated tokens over the call's wall time, prefill included
    decode_tokens_per_second: float | None  # decode alone (decode_tokens_per_second); None: no timestamps


def timed_run(llm, requests: list[dict], params) -> TimedRun:
    start = time.perf_counter()
    outputs = llm.generate(requests, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    tokens = sum(len(output.outputs[0].token_ids) for output in outputs)
    return TimedRun(tokens / elapsed, decode_tokens_per_second(outputs))


def decode_tokens_per_second(outputs) -> float | None:
    """The requests' decode throughput: each one's tokens after its first, over its first-to-last time.

    From vLLM's engine-core timestamps (``RequestOutput.metrics``, present when
    the engine logs stats), so a prefill's cost, which a posterior gate raises
    and a cached prefix lowers, is left out. Summed over requests: they decode
    together, so their rates add. None without timestamps or decoded tokens.
    """
    rates = []
    for output in outputs:
        stats, generated = output.metrics, len(output.outputs[0].token_ids)
        if stats is None or generated < 2 or not stats.last_token_ts > stats.first_token_ts > 0:
            return None
        rates.append((generated - 1) / (stats.last_token_ts - stats.first_token_ts))
    return sum(rates) if rates else None


def paired_runs(baseline, candidate, requests_of: Callable[[int], list[dict]], params,
                concurrencies, repeats: int) -> dict[int, dict]:
    """Two live engines timed alternately (round r: baseline, then candidate, on the same prompts).

    Per concurrency: each engine's best whole-request and decode tokens/s, the
    candidate-over-baseline ratio of every round (whole requests, and decode
    alone when vLLM gave timestamps) and their medians.
    """
    paired = {}
    for concurrency in concurrencies:
        requests = requests_of(concurrency)
        rounds = [(timed_run(baseline, requests, params), timed_run(candidate, requests, params))
                  for _ in range(repeats)]
        paired[concurrency] = paired_figures(rounds)
    return paired


def paired_figures(rounds: list[tuple[TimedRun, TimedRun]]) -> dict:
    """``[(baseline, candidate)]`` per round -> best tokens/s of each, per-round ratios, medians."""
    ratios = [candidate.tokens_per_second / base.tokens_per_second for base, candidate in rounds]
    decode_ratios = [candidate.decode_tokens_per_second / base.decode_tokens_per_second
                     for base, candidate in rounds
                     if base.decode_tokens_per_second and candidate.decode_tokens_per_second]
    return {
        "baseline": best_run([base for base, _ in rounds]).tokens_per_second,
        "candidate": best_run([candidate for _, candidate in rounds]).tokens_per_second,
        "ratios": ratios, "ratio": statistics.median(ratios),
        "decode_ratios": decode_ratios, "decode_ratio": statistics.median(decode_ratios) if decode_ratios else None,
        "rounds": [{"baseline": asdict(base), "candidate": asdict(candidate)} for base, candidate in rounds],
    }


def best_run(runs: list[TimedRun]) -> TimedRun:
    """The best whole-request and the best decode tokens/s of repeated runs (each its own best)."""
    decode = [run.decode_tokens_per_second for run in runs if run.decode_tokens_per_second]
    return TimedRun(max(run.tokens_per_second for run in runs), max(decode) if decode else None)


def best_runs(paired: dict[int, dict], side: str) -> dict[int, TimedRun]:
    """One side's (``"baseline"`` or ``"candidate"``) ``best_run`` per concurrency."""
    return {concurrency: best_run([TimedRun(**round_[side]) for round_ in figures["rounds"]])
            for concurrency, figures in paired.items()}
