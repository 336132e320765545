"""Under vLLM's async scheduling every output of the composite stays exact.

With async scheduling (vLLM's default on GPUs) the engine core schedules step
N+1 before step N's tokens reach it: the worker's output lists hold placeholders
for tokens in flight, with a draft as many as its tokens, assumed accepted
until the next step corrects them, and a finished request can run one step
more. vLLM's CPU backend turns it off; ``cpu_async`` turns it back on with
vLLM's own scheduler and model runner, only the CUDA stream calls stubbed.

One engine over the posterior composite (``conftest.posterior_composite``),
fp32, blocks of 32, asserted to run async in its worker: no draft, prefix
caching on, a 16-token budget per step (chunked prefill) and a tiny KV cache, so
shared prefixes hit the cache, requests end one by one and some are preempted.
With a draft, ``test_spec_decode.py``'s posterior engine runs async too.

Each request is held to the exact offline reference (``posterior_harness``):
per-token weights from the gate trace within 1e-4, top-20 log-probs within
1e-3, greedy tokens the mixture's argmax.
"""

from __future__ import annotations

import pytest
from vllm import LLM, SamplingParams

from gatemix.engine.engine_config import EngineSettings, engine_kwargs, stopping
from gatemix.engine.request_gates import gate_request_args
from tests.engine.cpu_async import async_llm
from tests.engine.posterior_harness import (
    check_generation,
    collect_trace,
    engine_counter,
    token_prompts,
)

BLOCK = 32
TOP = 20


def _async_engine(composite, engine_args: dict, **settings) -> LLM:
    settings = EngineSettings(dtype="float32", max_model_len=192, max_num_seqs=4, **settings)
    return async_llm({**engine_kwargs(composite, settings), **engine_args, "block_size": BLOCK,
                      "disable_log_stats": False})


@pytest.fixture(scope="module")
def async_engine(posterior_composite):
    """8 blocks (one vLLM's null block) for four requests of up to 114 tokens: preemption."""
    with stopping(_async_engine(posterior_composite, {"num_gpu_blocks_override": 8}, max_num_batched_tokens=16)) as llm:
        yield llm


def _check_traced(teacher, llm, prompts, max_tokens: list[int], trace_socket, tag: str) -> None:
    socket, address = trace_socket
    params = [
        SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True, logprobs=TOP,
                       extra_args=gate_request_args(trace_id=f"{tag}{i}", trace_to=address))
        for i, tokens in enumerate(max_tokens)
    ]
    outputs = [request.outputs[0] for request in llm.generate(
        [{"prompt_token_ids": prompt} for prompt in prompts], params, use_tqdm=False)]
    traced = collect_trace(socket, {f"{tag}{i}": tokens for i, tokens in enumerate(max_tokens)})
    for i, (prompt, output) in enumerate(zip(prompts, outputs)):
        assert len(output.token_ids) == max_tokens[i]
        check_generation(teacher, prompt, output, traced[f"{tag}{i}"], greedy=True)


@pytest.mark.slow
def test_chunked_cached_and_preempted_requests_are_exact_under_async_scheduling(async_engine, teacher, trace_socket):
    """Four prompts of 74 tokens sharing their first 32, decoding 40 down to 10 tokens (ending one
    by one), twice: the second round hits the cache; the 7 usable blocks cannot hold all four."""
    hits, preemptions = (engine_counter(async_engine, name) for name in ("vllm:prefix_cache_hits", "vllm:num_preemptions"))
    prompts = token_prompts(4, 74, shared=32)
    for repeat in range(2):
        _check_traced(teacher, async_engine, prompts, [40, 30, 20, 10], trace_socket, f"async{repeat}-")
    assert engine_counter(async_engine, "vllm:prefix_cache_hits") > hits, "the shared prefix should hit the cache"
    assert engine_counter(async_engine, "vllm:num_preemptions") > preemptions, "the tiny KV cache should preempt"
