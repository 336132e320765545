"""The fused engine serves the exact mixture: checked against transformers.

The reference is computed independently of gatemix's own math: each expert is
run by ``transformers`` from its own folder, and the mixture is summed in
probability space in float64.
"""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM
from vllm import SamplingParams

from gatemix.demo.corpus import load_split
from gatemix.engine.engine_config import build_offline_engine, stopping
from gatemix.engine.request_gates import gate_request_args

TOP = 20
WEIGHT_SETTINGS = {
    "uniform": None,  # the composite's own (uniform) gate, through the router path
    "skewed": [0.6, 0.3, 0.1],
    "one-hot": [0.0, 1.0, 0.0],
}


@pytest.fixture(scope="module")
def engine(composite_dir):
    with stopping(build_offline_engine(composite_dir, dtype="float32", max_model_len=256, max_num_seqs=8)) as llm:
        yield llm


@pytest.fixture(scope="module")
def reference(demo_paths):
    tokenizer = AutoTokenizer.from_pretrained(demo_paths.expert_dirs["code"])
    experts = [
        LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        for path in demo_paths.expert_dirs.values()
    ]
    return tokenizer, experts


@pytest.fixture(scope="module")
def prompts(demo_paths, reference) -> list[list[int]]:
    tokenizer, _ = reference
    texts = []
    for domain in demo_paths.expert_dirs:
        texts += [text[:200] for text in load_split(demo_paths.root, domain, "eval")[:2]]
    ids = [tokenizer(text, add_special_tokens=False).input_ids[:48] for text in texts]
    return [p for p in ids if len(p) >= 8][:6]


def _reference_logprobs(experts, token_ids: list[int], weights: list[float]) -> torch.Tensor:
    """float64 log sum_k w_k softmax(z_k) at the last position, from transformers."""
    with torch.no_grad():
        probs = [
            torch.softmax(expert(torch.tensor([token_ids])).logits[0, -1].double(), -1) for expert in experts
        ]
    return torch.log(sum(w * p for w, p in zip(weights, probs)))


def _params(weights, **kwargs) -> SamplingParams:
    extra = gate_request_args(pinned_weights=weights) if weights is not None else None
    return SamplingParams(extra_args=extra, **kwargs)


@pytest.mark.parametrize("setting", list(WEIGHT_SETTINGS))
def test_next_token_logprobs_equal_the_reference_mixture(engine, reference, prompts, setting):
    _, experts = reference
    weights = WEIGHT_SETTINGS[setting] or [1 / len(experts)] * len(experts)
    assert len(prompts) >= 5
    outputs = engine.generate(
        [{"prompt_token_ids": p} for p in prompts],
        _params(WEIGHT_SETTINGS[setting], max_tokens=1, temperature=0.0, logprobs=TOP),
        use_tqdm=False,
    )
    for prompt, output in zip(prompts, outputs):
        expected = _reference_logprobs(experts, prompt, weights)
        engine_top = output.outputs[0].logprobs[0]
        ref_top = set(expected.topk(TOP).indices.tolist())
        assert len(set(engine_top) & ref_top) >= TOP - 1  # ties at the boundary may swap one
        for token_id, logprob in engine_top.items():
            assert abs(logprob.logprob - expected[token_id].item()) < 1e-3, (setting, token_id)


def test_greedy_generation_matches_reference_greedy_decode(engine, reference, prompts):
    _, experts = reference
    weights = WEIGHT_SETTINGS["skewed"]
    outputs = engine.generate(
        [{"prompt_token_ids": p} for p in prompts[:3]],
        _params(weights, max_tokens=32, temperature=0.0, ignore_eos=True),
        use_tqdm=False,
    )
    for prompt, output in zip(prompts, outputs):
        tokens = list(prompt)
        for _ in range(32):
            tokens.append(int(_reference_logprobs(experts, tokens, weights).argmax()))
        assert list(output.outputs[0].token_ids) == tokens[len(prompt):]


def test_pinned_weights_are_per_request_within_one_batch(engine, reference, prompts):
    """Two requests batched together, pinned to different experts, each get their own expert."""
    _, experts = reference
    pins = [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]
    requests = [{"prompt_token_ids": prompts[0]}] * 2
    params = [_params(pin, max_tokens=1, temperature=0.0, logprobs=5) for pin in pins]
    outputs = engine.generate(requests, params, use_tqdm=False)
    for pin, output in zip(pins, outputs):
        expected = _reference_logprobs(experts, prompts[0], pin)
        for token_id, logprob in output.outputs[0].logprobs[0].items():
            assert abs(logprob.logprob - expected[token_id].item()) < 1e-3


def test_prompt_logprobs_use_the_request_weights(engine, reference, prompts):
    """echo-style scoring: every prompt position is mixed with the request's own weights."""
    _, experts = reference
    weights = WEIGHT_SETTINGS["skewed"]
    prompt = prompts[1][:16]
    output = engine.generate(
        [{"prompt_token_ids": prompt}], _params(weights, max_tokens=1, prompt_logprobs=0), use_tqdm=False
    )[0]
    for position in range(1, len(prompt)):
        expected = _reference_logprobs(experts, prompt[:position], weights)[prompt[position]].item()
        assert abs(output.prompt_logprobs[position][prompt[position]].logprob - expected) < 1e-3


def test_tensor_parallel_engine_serves_the_same_mixture(composite_dir, reference, prompts, monkeypatch):
    """Two tensor-parallel workers (one per CPU core here) give the reference mixture too."""
    from gatemix.engine.engine_config import on_cpu

    if on_cpu():
        if (os.cpu_count() or 1) < 2:
            pytest.skip("tensor parallelism on CPU needs two cores")
        monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # one core per TP worker
    elif torch.cuda.device_count() < 2:
        pytest.skip("tensor parallelism needs two GPUs")
    _, experts = reference
    weights = WEIGHT_SETTINGS["skewed"]
    with stopping(build_offline_engine(
        composite_dir, dtype="float32", max_model_len=256, max_num_seqs=4, tensor_parallel_size=2
    )) as llm:
        outputs = llm.generate(
            [{"prompt_token_ids": p} for p in prompts[:2]],
            _params(weights, max_tokens=1, temperature=0.0, logprobs=TOP), use_tqdm=False,
        )
    for prompt, output in zip(prompts, outputs):
        expected = _reference_logprobs(experts, prompt, weights)
        for token_id, logprob in output.outputs[0].logprobs[0].items():
            assert abs(logprob.logprob - expected[token_id].item()) < 1e-3


COMPILE_PROMPTS = [list(range(20 + 7 * i, 40 + 7 * i)) for i in range(3)]


def test_compiled_composite_matches_eager(engine, composite_dir):
    """Under vLLM's torch.compile (``enforce_eager=False``) and with the mixing step compiled
    (``compile_mixing``) the composite gives the eager mixture.

    ``ExpertEnsemble`` is vLLM-compiled (``@support_torch_compile``); the router
    and the per-request overrides stay outside the graph, and the mixing is its
    own ``torch.compile`` (``engine/mixing_step.py``). On CPU this is Inductor's
    C++ backend; CUDA graphs are not exercised here (no GPU).
    """
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, logprobs=10)
    prompts = [{"prompt_token_ids": ids} for ids in COMPILE_PROMPTS]
    eager = [out.outputs[0] for out in engine.generate(prompts, params, use_tqdm=False)]
    with stopping(build_offline_engine(
        composite_dir, dtype="float32", max_model_len=128, max_num_seqs=4, enforce_eager=False,
        compile_mixing=True,
    )) as llm:
        compiled = [out.outputs[0] for out in llm.generate(prompts, params, use_tqdm=False)]
    for a, b in zip(eager, compiled):
        assert a.token_ids == b.token_ids
        for top_a, top_b in zip(a.logprobs, b.logprobs):
            shared = set(top_a) & set(top_b)
            assert len(shared) >= 8
            assert max(abs(top_a[t].logprob - top_b[t].logprob) for t in shared) < 1e-3
