"""Prefix caching with a posterior gate: a request that reuses cached blocks gets the weights of one that does not.

Each case is held to the exact offline reference (``posterior_harness``), the
one the engine with caching off matches (``test_posterior_state.py``): per-token
weights within 1e-4, the top-20 log-probs within 1e-3, greedy tokens the
mixture's argmax. Blocks are 32 tokens (the CPU kernels' smallest), and each
case asserts that vLLM's prefix cache did hit, so none passes by recomputing.
"""

from __future__ import annotations

import pytest
import torch
from vllm import LLM, SamplingParams

from gatemix.engine.engine_config import EngineSettings, engine_kwargs, stopping
from gatemix.engine.request_gates import gate_request_args
from tests.engine.posterior_harness import (
    GENERATED,
    check_generation,
    collect_trace,
    engine_counter,
)

BLOCK = 32
TOP = 20


def _engine(composite, max_model_len: int = 256, **overrides) -> LLM:
    settings = EngineSettings(dtype="float32", max_model_len=max_model_len, max_num_seqs=4)
    assert settings.enable_prefix_caching, "caching is the default for every composite"
    return LLM(**engine_kwargs(composite, settings), block_size=BLOCK, disable_log_stats=False, **overrides)


@pytest.fixture(scope="module")
def cached_engine(posterior_composite):
    with stopping(_engine(posterior_composite, max_num_batched_tokens=256)) as llm:
        yield llm


@pytest.fixture(scope="module")
def tiny_cache_engine(posterior_composite):
    """8 blocks of 32 tokens (one of them vLLM's null block) for requests of up to 131 tokens: eviction, preemption."""
    with stopping(_engine(posterior_composite, max_model_len=192, num_gpu_blocks_override=8)) as llm:
        yield llm


def _generate(llm, prompts, socket_address=None, tag="", max_tokens=GENERATED):
    params = [
        SamplingParams(
            max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=TOP,
            extra_args=gate_request_args(trace_id=f"{tag}{i}", trace_to=socket_address) if socket_address else None,
        )
        for i in range(len(prompts))
    ]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [output.outputs[0] for output in outputs]


def _check_all(teacher, llm, prompts, trace_socket, tag: str) -> list:
    socket, address = trace_socket
    outputs = _generate(llm, prompts, address, tag)
    traced = collect_trace(socket, {f"{tag}{i}": GENERATED for i in range(len(prompts))})
    for i, (prompt, output) in enumerate(zip(prompts, outputs)):
        check_generation(teacher, prompt, output, traced[f"{tag}{i}"], greedy=True)
    return outputs


def _tokens(start: int, count: int) -> list[int]:
    return [(start + 7 * i) % 1900 + 20 for i in range(count)]


@pytest.mark.slow
def test_a_repeated_prompt_continues_from_its_cached_blocks(cached_engine, teacher, trace_socket):
    prompt = _tokens(5, 3 * BLOCK + 5)
    hits = engine_counter(cached_engine, "vllm:prefix_cache_hits")
    _check_all(teacher, cached_engine, [prompt], trace_socket, "repeat-a")
    _check_all(teacher, cached_engine, [prompt], trace_socket, "repeat-b")
    assert engine_counter(cached_engine, "vllm:prefix_cache_hits") - hits >= 3 * BLOCK


@pytest.mark.slow
def test_prompts_sharing_three_blocks_with_different_tails(cached_engine, teacher, trace_socket):
    """One batch: the second and third prompts hit blocks the first computes in the same step."""
    shared = _tokens(11, 3 * BLOCK)
    prompts = [shared + _tokens(100 + 13 * i, 9 + i) for i in range(3)]
    hits = engine_counter(cached_engine, "vllm:prefix_cache_hits")
    _check_all(teacher, cached_engine, prompts, trace_socket, "shared")
    assert engine_counter(cached_engine, "vllm:prefix_cache_hits") - hits >= 2 * 3 * BLOCK


@pytest.mark.slow
def test_a_three_turn_chat_reuses_each_earlier_turn(cached_engine, teacher, trace_socket):
    conversation = _tokens(17, 40)
    hits = engine_counter(cached_engine, "vllm:prefix_cache_hits")
    for turn in range(3):
        (output,) = _check_all(teacher, cached_engine, [conversation], trace_socket, f"turn{turn}-")
        conversation = conversation + list(output.token_ids) + _tokens(300 + turn, 12)
    # Turn 1 leaves KV for 71 tokens (40 + 31: the last sampled token is never run), 2 full blocks, which
    # turn 2 (84 tokens) reuses; turn 2 leaves 115, 3 blocks, which turn 3 (128 tokens) reuses.
    assert engine_counter(cached_engine, "vllm:prefix_cache_hits") - hits >= 5 * BLOCK


@pytest.mark.slow
def test_echo_prompt_logprobs_on_a_cached_prompt(cached_engine, teacher):
    """vLLM does not read the prefix cache for a request with prompt logprobs: every position is computed."""
    prompt = _tokens(23, 2 * BLOCK + 7)
    _generate(cached_engine, [prompt], max_tokens=1)  # cached now
    output = cached_engine.generate(
        [{"prompt_token_ids": prompt}], SamplingParams(max_tokens=1, prompt_logprobs=TOP), use_tqdm=False
    )[0]
    mixture, _ = teacher(torch.tensor([prompt]))
    for position in range(1, len(prompt)):
        for token_id, logprob in output.prompt_logprobs[position].items():
            assert abs(logprob.logprob - mixture[0, position - 1, token_id].item()) < 1e-3, position


@pytest.mark.slow
def test_evicted_blocks_are_recomputed_and_rewritten(tiny_cache_engine, teacher, trace_socket):
    """A prompt, then two others that take its blocks, then the prompt again, then a prompt sharing its prefix."""
    first = _tokens(29, 3 * BLOCK + 3)
    _check_all(teacher, tiny_cache_engine, [first], trace_socket, "evict-a")
    for i in range(2):
        _check_all(teacher, tiny_cache_engine, [_tokens(500 + 31 * i, 3 * BLOCK + 3)], trace_socket, f"evict-b{i}")
    hits = engine_counter(tiny_cache_engine, "vllm:prefix_cache_hits")
    _check_all(teacher, tiny_cache_engine, [first], trace_socket, "evict-c")
    _check_all(teacher, tiny_cache_engine, [first[: 3 * BLOCK] + _tokens(900, 4)], trace_socket, "evict-d")
    assert engine_counter(tiny_cache_engine, "vllm:prefix_cache_hits") - hits >= 3 * BLOCK


@pytest.mark.slow
def test_preempted_requests_stay_exact_with_caching_on(tiny_cache_engine, teacher):
    """Four requests of 69 tokens in 7 blocks: some are preempted, freed, and recomputed when they resume."""
    preemptions = engine_counter(tiny_cache_engine, "vllm:num_preemptions")
    prompts = [_tokens(30 + 5 * i, 37) for i in range(4)]
    outputs = _generate(tiny_cache_engine, prompts)
    assert engine_counter(tiny_cache_engine, "vllm:num_preemptions") > preemptions, "the tiny KV cache should preempt"
    for prompt, output in zip(prompts, outputs):
        check_generation(teacher, prompt, output, None, greedy=True)
