"""The posterior state in the engine equals the offline gate, under everything vLLM does to a request.

The composite's router is random (not fitted) with a posterior of forgetting
0.9 and a head that reads the posterior's log-weights: its weights move with
every token of the prefix, so a token folded twice, missed, or folded at the
wrong position would show. The reference is the offline router over
``transformers`` experts (``EnsembleTeacher``), on the whole sequence at once.

One engine with a token budget of 16 per step runs chunked prefill on every
prompt here; a second one with a tiny KV cache forces preemption with recompute.
"""

from __future__ import annotations

import gc
import math
import time

import msgspec
import pytest
import torch
import zmq
from vllm import LLM, SamplingParams

from gatemix.distill.teacher import EnsembleTeacher
from gatemix.engine.engine_config import EngineSettings, build_offline_engine, engine_kwargs, shutdown_offline_engine
from gatemix.engine.pack import pack_composite
from gatemix.engine.request_gates import gate_request_args
from gatemix.expert_folder import expert_hash
from gatemix.gate.artifact import RouterArtifact
from gatemix.gate.router import HiddenStateRouter, RouterForm

GENERATED = 32
FORGETTING = 0.9


@pytest.fixture(scope="module")
def posterior_composite(demo_paths, tmp_path_factory):
    names = list(demo_paths.expert_dirs)
    torch.manual_seed(3)
    import json

    hidden = json.loads((demo_paths.expert_dirs[names[0]] / "config.json").read_text())["hidden_size"]
    router = HiddenStateRouter(RouterForm(len(names), hidden, 16, posterior=True, posterior_features=True))
    with torch.no_grad():
        router.proj_in.weight.mul_(3.0)
        router.proj_out.weight.mul_(3.0)
        router.prior_logits.copy_(torch.tensor([0.8, -0.5, 0.1]))
        router.forgetting_raw.fill_(math.log(math.expm1(-math.log(FORGETTING))))  # lambda = 0.9
    assert abs(router.forgetting.item() - FORGETTING) < 1e-6
    artifact = RouterArtifact(
        router=router, expert_names=names,
        expert_hashes={n: expert_hash(p) for n, p in demo_paths.expert_dirs.items()}, method="random-test",
    )
    out = tmp_path_factory.mktemp("posterior") / "composite"
    pack_composite(list(demo_paths.expert_dirs.values()), out, gate=artifact)
    return out


@pytest.fixture(scope="module")
def teacher(posterior_composite, demo_paths):
    return EnsembleTeacher.load(posterior_composite, list(demo_paths.expert_dirs.values()))


@pytest.fixture(scope="module")
def trace_socket(tmp_path_factory):
    context = zmq.Context()
    socket = context.socket(zmq.PULL)
    address = f"ipc://{tmp_path_factory.mktemp('trace')}/trace.sock"
    socket.bind(address)
    yield socket, address
    socket.close()
    context.term()


@pytest.fixture(scope="module")
def chunked_engine(posterior_composite):
    """Every prompt longer than 16 tokens is prefilled in chunks."""
    llm = build_offline_engine(
        posterior_composite, dtype="float32", max_model_len=256, max_num_seqs=4, max_num_batched_tokens=16
    )
    yield llm
    shutdown_offline_engine(llm)
    del llm
    gc.collect()


def _prompts() -> list[list[int]]:
    return [list(range(40 + 3 * i, 40 + 3 * i + 37)) for i in range(2)]


def _collect(socket, expected: dict[str, int]) -> dict[str, dict[int, list[float]]]:
    weights: dict[str, dict[int, list[float]]] = {trace: {} for trace in expected}
    deadline = time.time() + 10
    while time.time() < deadline and any(len(weights[t]) < n for t, n in expected.items()):
        try:
            payload = socket.recv(zmq.NOBLOCK)
        except zmq.Again:
            time.sleep(0.05)
            continue
        for trace_id, index, row in msgspec.msgpack.decode(payload):
            weights.setdefault(trace_id, {})[index] = row
    return weights


def _check_generation(teacher, prompt, output, traced: dict[int, list[float]] | None) -> None:
    """Per-token weights within 1e-4 (when traced) and sampled-token logprobs within 1e-3."""
    sequence = torch.tensor([prompt + list(output.token_ids)])
    mixture, log_weights = teacher(sequence)
    offline = log_weights[0].exp()  # position p's weights decide token p + 1
    if traced is not None:
        assert sorted(traced) == list(range(len(output.token_ids)))
        assert offline[len(prompt) - 1 :].std(0).max() > 0.01, "the weights should move with the prefix"
        for index, row in traced.items():
            torch.testing.assert_close(torch.tensor(row), offline[len(prompt) - 1 + index], atol=1e-4, rtol=0)
    for index, top in enumerate(output.logprobs):
        for token_id, logprob in top.items():
            assert abs(logprob.logprob - mixture[0, len(prompt) - 1 + index, token_id].item()) < 1e-3


@pytest.mark.slow
def test_chunked_prefill_and_repeated_prompts_give_the_offline_weights(chunked_engine, teacher, trace_socket):
    """Prompts of 37 tokens in 16-token chunks, each sent twice (prefix caching is off for a posterior)."""
    socket, address = trace_socket
    assert chunked_engine.llm_engine.vllm_config.cache_config.enable_prefix_caching is False
    for repeat in range(2):
        prompts = _prompts()
        params = [
            SamplingParams(
                max_tokens=GENERATED, temperature=0.0, ignore_eos=True, logprobs=3,
                extra_args=gate_request_args(trace_id=f"r{repeat}p{i}", trace_to=address),
            )
            for i in range(len(prompts))
        ]
        outputs = chunked_engine.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        traced = _collect(socket, {f"r{repeat}p{i}": GENERATED for i in range(len(prompts))})
        for i, (prompt, output) in enumerate(zip(prompts, outputs)):
            _check_generation(teacher, prompt, output.outputs[0], traced[f"r{repeat}p{i}"])


@pytest.mark.slow
def test_echo_prompt_logprobs_use_each_position_s_own_prefix(chunked_engine, teacher):
    prompt = _prompts()[0]
    output = chunked_engine.generate(
        [{"prompt_token_ids": prompt}], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False
    )[0]
    mixture, _ = teacher(torch.tensor([prompt]))
    for position in range(1, len(prompt)):
        expected = mixture[0, position - 1, prompt[position]].item()
        assert abs(output.prompt_logprobs[position][prompt[position]].logprob - expected) < 1e-3, position


@pytest.mark.slow
def test_each_of_n_samples_carries_its_own_state(chunked_engine, teacher):
    prompt = _prompts()[1]
    # No per-request seed: vLLM's CPU sampler refuses one ("CPU Generator does not use offset").
    params = SamplingParams(n=2, max_tokens=GENERATED, temperature=1.0, ignore_eos=True, logprobs=3)
    output = chunked_engine.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]
    assert len(output.outputs) == 2
    for sample in output.outputs:
        _check_generation(teacher, prompt, sample, None)


@pytest.mark.slow
def test_preempted_requests_rebuild_their_state(posterior_composite, teacher):
    """A KV cache of 8 blocks of 32 tokens for 4 requests of 69 tokens: requests are preempted and recomputed."""
    kwargs = engine_kwargs(posterior_composite, EngineSettings(dtype="float32", max_model_len=128, max_num_seqs=4))
    llm = LLM(**kwargs, block_size=32, num_gpu_blocks_override=8, disable_log_stats=False)
    try:
        prompts = [list(range(30 + 5 * i, 30 + 5 * i + 37)) for i in range(4)]
        params = SamplingParams(max_tokens=GENERATED, temperature=0.0, ignore_eos=True, logprobs=3)
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        preemptions = sum(
            metric.value for metric in llm.get_metrics() if metric.name == "vllm:num_preemptions"
        )
    finally:
        shutdown_offline_engine(llm)
        del llm
        gc.collect()
    assert preemptions > 0, "the tiny KV cache should have forced preemption"
    for prompt, output in zip(prompts, outputs):
        _check_generation(teacher, prompt, output.outputs[0], None)
