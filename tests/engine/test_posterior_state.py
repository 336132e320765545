"""The posterior state in the engine equals the offline gate, with prefix caching off.

The reference (``posterior_harness``) is the offline router over
``transformers`` experts on the whole sequence at once. One engine with a token
budget of 16 per step and prefix caching off runs chunked prefill on every
prompt here: the plain path that ``test_prefix_caching.py`` holds the cached
one to.
"""

from __future__ import annotations

import pytest
import torch
from vllm import SamplingParams

from gatemix.engine.engine_config import build_offline_engine, stopping
from gatemix.engine.request_gates import gate_request_args
from tests.engine.posterior_harness import (
    GENERATED,
    check_generation,
    chunked_prompts,
    collect_trace,
)


@pytest.fixture(scope="module")
def chunked_engine(posterior_composite):
    """Every prompt longer than 16 tokens is prefilled in chunks."""
    with stopping(build_offline_engine(
        posterior_composite, dtype="float32", max_model_len=256, max_num_seqs=4, max_num_batched_tokens=16,
        enable_prefix_caching=False,
    )) as llm:
        yield llm


@pytest.mark.slow
def test_chunked_prefill_and_repeated_prompts_give_the_offline_weights(chunked_engine, teacher, trace_socket):
    """Prompts of 37 tokens in 16-token chunks, each sent twice."""
    socket, address = trace_socket
    assert chunked_engine.llm_engine.vllm_config.cache_config.enable_prefix_caching is False
    for repeat in range(2):
        prompts = chunked_prompts()
        params = [
            SamplingParams(
                max_tokens=GENERATED, temperature=0.0, ignore_eos=True, logprobs=3,
                extra_args=gate_request_args(trace_id=f"r{repeat}p{i}", trace_to=address),
            )
            for i in range(len(prompts))
        ]
        outputs = chunked_engine.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        traced = collect_trace(socket, {f"r{repeat}p{i}": GENERATED for i in range(len(prompts))})
        for i, (prompt, output) in enumerate(zip(prompts, outputs)):
            check_generation(teacher, prompt, output.outputs[0], traced[f"r{repeat}p{i}"], greedy=True)


@pytest.mark.slow
def test_echo_prompt_logprobs_use_each_position_s_own_prefix(chunked_engine, teacher):
    prompt = chunked_prompts()[0]
    output = chunked_engine.generate(
        [{"prompt_token_ids": prompt}], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False
    )[0]
    mixture, _ = teacher(torch.tensor([prompt]))
    for position in range(1, len(prompt)):
        expected = mixture[0, position - 1, prompt[position]].item()
        assert abs(output.prompt_logprobs[position][prompt[position]].logprob - expected) < 1e-3, position


@pytest.mark.slow
def test_each_of_n_samples_carries_its_own_state(chunked_engine, teacher):
    prompt = chunked_prompts()[1]
    # No per-request seed: vLLM's CPU sampler refuses one ("CPU Generator does not use offset").
    params = SamplingParams(n=2, max_tokens=GENERATED, temperature=1.0, ignore_eos=True, logprobs=3)
    output = chunked_engine.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]
    assert len(output.outputs) == 2
    for sample in output.outputs:
        check_generation(teacher, prompt, sample, None)


@pytest.mark.slow
def test_requests_ending_one_by_one_keep_their_own_states(chunked_engine, teacher, trace_socket):
    """Four requests of different lengths: as each ends, vLLM removes its row and moves the last row into
    the hole, and the steady decode path carries every remaining row's state along (``engine/decode_run.py``)."""
    socket, address = trace_socket
    prompts = [list(range(60 + 5 * i, 60 + 5 * i + 9 + 3 * i)) for i in range(4)]  # 9-18 tokens
    lengths = [4, 9, 15, 24]
    params = [
        SamplingParams(max_tokens=length, temperature=0.0, ignore_eos=True, logprobs=3,
                       extra_args=gate_request_args(trace_id=f"end{i}", trace_to=address))
        for i, length in enumerate(lengths)
    ]
    outputs = chunked_engine.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    traced = collect_trace(socket, {f"end{i}": length for i, length in enumerate(lengths)})
    for i, (prompt, output) in enumerate(zip(prompts, outputs)):
        assert len(output.outputs[0].token_ids) == lengths[i]
        check_generation(teacher, prompt, output.outputs[0], traced[f"end{i}"], greedy=True)
