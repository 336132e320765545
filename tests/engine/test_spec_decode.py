"""Speculative decoding behind a draft model leaves every output of the composite exact.

Two engines, fp32, each with vLLM's own draft-model speculative decoding:

* the posterior composite (``conftest.posterior_composite``: a random head over
  the experts' hidden states and their posterior, forgetting 0.9) with one of the
  demo's trained experts as the draft, which is often right, so drafts are
  accepted and rejected and the state is rolled back; its KV cache is tiny, so
  requests are preempted; it runs under vLLM's async scheduling (``cpu_async``);
* a composite whose router has its own causal context model, with a random-init
  one-layer draft that disagrees on purpose, scheduled synchronously (a CPU's
  default).

The reference is the offline router over ``transformers`` experts
(``posterior_harness``), which the engine without a draft matches
(``test_posterior_state.py``, ``test_learned_router.py``): per-token weights
within 1e-4, returned top-20 log-probs within 1e-3, greedy tokens the
mixture's argmax.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer
from vllm import LLM, SamplingParams
from vllm.exceptions import VLLMValidationError
from vllm.sampling_params import StructuredOutputsParams

from gatemix.bench.draft_bench import domain_acceptance
from gatemix.demo.corpus import load_split
from gatemix.distill.teacher import EnsembleTeacher
from gatemix.engine.composite_folder import GATE_SUBDIR
from gatemix.engine.engine_config import (
    EngineSettings,
    engine_kwargs,
    on_cpu,
    stopping,
)
from gatemix.engine.gate_reload import RELOAD_METHOD
from gatemix.engine.pack import pack_composite, parse_gate_spec
from gatemix.engine.request_gates import gate_request_args
from gatemix.engine.spec_decode import CPU_SAMPLING_WITH_DRAFT
from gatemix.expert_folder import read_expert
from gatemix.gate.artifact import save_router
from gatemix.gate.mixing import mix_logits, restrict_log_weights
from gatemix.gate.router import context_config_like
from gatemix.server.choices import DraftAcceptance
from tests.engine.arch_experts import make_expert
from tests.engine.cpu_async import async_llm
from tests.engine.posterior_harness import (
    accepted_weights,
    check_generation,
    collect_trace,
    engine_counter,
    token_prompts,
)
from tests.random_router import random_router_artifact

BLOCK = 32
TOP = 20
DECODED = 48
DRAFT_TOKENS = 3


def _engine(composite, draft, async_scheduling: bool = False, **overrides) -> LLM:
    settings = EngineSettings(dtype="float32", max_model_len=192, max_num_seqs=4, draft=str(draft),
                              num_draft_tokens=DRAFT_TOKENS)
    engine_args = {**engine_kwargs(composite, settings), "block_size": BLOCK, "disable_log_stats": False, **overrides}
    return async_llm(engine_args) if async_scheduling else LLM(**engine_args)


@pytest.fixture(scope="module")
def spec_engine(posterior_composite, demo_paths):
    """12 blocks of 32 tokens (one is vLLM's null block), shared with the draft's layers: 5 requests of 90
    preempt. Under vLLM's async scheduling (``cpu_async``), the GPU default: the worker assumes every draft
    token accepted until the next step corrects it, which the state and the gate trace must not."""
    draft = demo_paths.expert_dirs["code"]
    with stopping(_engine(posterior_composite, draft, async_scheduling=True, num_gpu_blocks_override=12)) as llm:
        yield llm


@pytest.fixture(scope="module")
def context_composite(demo_paths, tmp_path_factory):
    config = json.loads((demo_paths.expert_dirs["code"] / "config.json").read_text())
    artifact = random_router_artifact(demo_paths.expert_dirs, context_config_like(config, num_layers=1))
    out = tmp_path_factory.mktemp("spec-context") / "composite"
    pack_composite(list(demo_paths.expert_dirs.values()), out, gate=artifact)
    return out


@pytest.fixture(scope="module")
def random_draft_engine(context_composite, demo_paths, tmp_path_factory):
    draft = make_expert(tmp_path_factory.mktemp("draft") / "random", "llama", demo_paths.expert_dirs["code"],
                        seed=11, num_hidden_layers=1)
    with stopping(_engine(context_composite, draft)) as llm:
        yield llm


def _generate(llm, prompts, address, tag, max_tokens=DECODED, **gate_args):
    params = [
        SamplingParams(
            max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=TOP,
            extra_args=gate_request_args(trace_id=f"{tag}{i}", trace_to=address, **gate_args),
        )
        for i in range(len(prompts))
    ]
    return [o.outputs[0] for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)]


def _check_traced(teacher, llm, prompts, trace_socket, tag):
    socket, address = trace_socket
    outputs = _generate(llm, prompts, address, tag)
    traced = collect_trace(socket, {f"{tag}{i}": DECODED for i in range(len(prompts))})
    for i, (prompt, output) in enumerate(zip(prompts, outputs)):
        assert len(output.token_ids) == DECODED
        check_generation(teacher, prompt, output, traced[f"{tag}{i}"], greedy=True)
    return outputs


@pytest.mark.slow
def test_greedy_decodes_weights_and_logprobs_are_exact_with_a_draft(spec_engine, teacher, trace_socket):
    """48 tokens for 5 prompts; drafts are accepted and rejected, and some requests are preempted."""
    accepted = engine_counter(spec_engine, "vllm:spec_decode_num_accepted_tokens")
    drafted = engine_counter(spec_engine, "vllm:spec_decode_num_draft_tokens")
    preemptions = engine_counter(spec_engine, "vllm:num_preemptions")
    outputs = _check_traced(teacher, spec_engine, token_prompts(5, 40), trace_socket, "greedy")
    accepted = engine_counter(spec_engine, "vllm:spec_decode_num_accepted_tokens") - accepted
    drafted = engine_counter(spec_engine, "vllm:spec_decode_num_draft_tokens") - drafted
    assert 0 < accepted < drafted, "drafts should be both accepted and rejected, so the state rolls back"
    assert engine_counter(spec_engine, "vllm:num_preemptions") > preemptions, "the small KV cache should preempt"
    # Each choice's own acceptance (what the server's /metrics counts per dominant expert) adds up
    # to the engine's, preemptions included.
    per_choice = [DraftAcceptance.of(output) for output in outputs]
    assert sum(choice.accepted_tokens for choice in per_choice) == accepted
    assert sum(choice.draft_tokens for choice in per_choice) == drafted
    assert all(choice.steps * DRAFT_TOKENS == choice.draft_tokens for choice in per_choice)


def _fixed_mixture(teacher, sequence: torch.Tensor, pinned=None, mask=None) -> torch.Tensor:
    """``(T, V)`` mixture log-probs with pinned weights, or the router's restricted to ``mask``."""
    _, log_weights = teacher(sequence)
    with torch.no_grad():
        logits = torch.stack([expert(input_ids=sequence).logits.float() for expert in teacher.experts], dim=-2)
    if pinned is not None:
        log_weights = torch.log(torch.tensor(pinned)).expand_as(log_weights)
    if mask is not None:
        log_weights = restrict_log_weights(log_weights, torch.tensor(mask).expand_as(log_weights))
    return mix_logits(logits, log_weights)[0]


@pytest.mark.slow
@pytest.mark.parametrize("gate", [{"pinned_weights": [0.2, 0.0, 0.8]}, {"expert_mask": [True, False, True]}])
def test_pinned_and_subset_requests_are_exact_with_a_draft(spec_engine, teacher, trace_socket, gate):
    socket, address = trace_socket
    prompts = token_prompts(2, 30)
    tag = "pin" if "pinned_weights" in gate else "subset"
    outputs = _generate(spec_engine, prompts, address, tag, **gate)
    traced = collect_trace(socket, {f"{tag}{i}": DECODED for i in range(len(prompts))})
    for i, (prompt, output) in enumerate(zip(prompts, outputs)):
        sequence = torch.tensor([prompt + list(output.token_ids)])
        mixture = _fixed_mixture(teacher, sequence, gate.get("pinned_weights"), gate.get("expert_mask"))
        weights = accepted_weights(traced[f"{tag}{i}"], list(output.token_ids))
        assert sorted(weights) == list(range(DECODED))
        if "expert_mask" in gate:
            assert all(row[1] == 0.0 for row in weights.values())
        for index, top in enumerate(output.logprobs):
            step = mixture[len(prompt) - 1 + index]
            assert step[output.token_ids[index]] >= step.max() - 1e-4, index
            for token_id, logprob in top.items():
                assert abs(logprob.logprob - step[token_id].item()) < 1e-3


@pytest.mark.slow
def test_the_draft_bench_counts_what_the_engine_counts(spec_engine):
    """``gatemix bench draft``'s per-domain figures are vLLM's own acceptance, split by domain."""
    accepted = engine_counter(spec_engine, "vllm:spec_decode_num_accepted_tokens")
    drafted = engine_counter(spec_engine, "vllm:spec_decode_num_draft_tokens")
    prompts = token_prompts(4, 24)
    by_domain = domain_acceptance(spec_engine, {"first": prompts[:2], "second": prompts[2:]}, 24)
    assert sum(row["accepted_tokens"] for row in by_domain.values()) == (
        engine_counter(spec_engine, "vllm:spec_decode_num_accepted_tokens") - accepted)
    assert sum(row["draft_tokens"] for row in by_domain.values()) == (
        engine_counter(spec_engine, "vllm:spec_decode_num_draft_tokens") - drafted)
    for row in by_domain.values():
        assert row["prompts"] == 2 and 1 <= row["mean_acceptance_length"] <= DRAFT_TOKENS + 1
        assert row["acceptance_rate"] == pytest.approx(row["accepted_tokens"] / row["draft_tokens"])


@pytest.mark.slow
def test_structured_outputs_are_exact_with_a_draft(spec_engine, teacher, trace_socket, demo_paths):
    """A grammar masks the verified rows too: the text is one of the choices, and along it every
    per-token weight is the mixture's. Log-probs come after the grammar's mask, so the returned
    ones are the mixture's renormalized over the allowed tokens: their differences are exact."""
    socket, address = trace_socket
    choices = ["def main(self): return the court", "The court held that the function returns"]
    tokenizer = AutoTokenizer.from_pretrained(demo_paths.expert_dirs["code"])
    prompt = tokenizer("Notes on the module: what it holds, and why the court kept it. ").input_ids
    params = SamplingParams(
        max_tokens=40, temperature=0.0, logprobs=TOP, structured_outputs=StructuredOutputsParams(choice=choices),
        extra_args=gate_request_args(trace_id="structured", trace_to=address))
    (request,) = spec_engine.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
    output = request.outputs[0]
    assert output.text in choices
    traced = collect_trace(socket, {"structured": len(output.token_ids)})
    check_generation(teacher, prompt, output, traced["structured"], check_logprobs=False)
    mixture = teacher(torch.tensor([prompt + list(output.token_ids)]))[0][0]  # (T, V)
    for index, top in enumerate(output.logprobs):
        step, chosen = mixture[len(prompt) - 1 + index], output.token_ids[index]
        assert all(logprob.logprob <= top[chosen].logprob + 1e-4 for logprob in top.values())
        allowed = {token_id: logprob for token_id, logprob in top.items() if logprob.logprob > -float("inf")}
        for token_id, logprob in allowed.items():
            exact = (step[token_id] - step[chosen]).item()
            assert abs(logprob.logprob - top[chosen].logprob - exact) < 1e-3, (index, token_id)


def _check_fixed(teacher, prompt, output, pinned) -> None:
    mixture = _fixed_mixture(teacher, torch.tensor([prompt + list(output.token_ids)]), pinned)
    for index, top in enumerate(output.logprobs):
        step = mixture[len(prompt) - 1 + index]
        assert step[output.token_ids[index]] >= step.max() - 1e-4, index
        for token_id, logprob in top.items():
            assert abs(logprob.logprob - step[token_id].item()) < 1e-3, index


@pytest.mark.slow
def test_a_gate_swapped_mid_request_with_a_draft(spec_engine, teacher, posterior_composite, demo_paths, tmp_path):
    """Hot reload between two speculative steps: the request in flight keeps the posterior router,
    a new one gets the new fixed weights; the router is swapped back for the other tests."""
    experts = [read_expert(path, name) for name, path in demo_paths.expert_dirs.items()]
    pinned = [0.1, 0.1, 0.8]
    fixed_version = save_router(parse_gate_spec(",".join(map(str, pinned)), experts), tmp_path / "fixed").version
    engine, outputs = spec_engine.llm_engine, {}
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=TOP)
    prompt = token_prompts(1, 30)[0]
    engine.add_request("before", {"prompt_token_ids": prompt}, params)
    for _ in range(3):  # mid-generation: a few verify steps in
        engine.step()
    try:
        assert spec_engine.collective_rpc(RELOAD_METHOD, args=(str(tmp_path / "fixed"),))[0]["version"] == fixed_version
        engine.add_request("after", {"prompt_token_ids": prompt}, params)
        while engine.has_unfinished_requests():
            outputs.update({output.request_id: output for output in engine.step() if output.finished})
    finally:
        spec_engine.collective_rpc(RELOAD_METHOD, args=(str(posterior_composite / GATE_SUBDIR),))
    check_generation(teacher, prompt, outputs["before"].outputs[0], None, greedy=True)
    _check_fixed(teacher, prompt, outputs["after"].outputs[0], pinned)


@pytest.mark.slow
def test_n_and_echo_prompt_logprobs_with_a_draft(spec_engine, teacher):
    prompt = token_prompts(1, 33)[0]
    params = SamplingParams(n=2, max_tokens=16, temperature=1.0, seed=7, ignore_eos=True, logprobs=TOP,
                            prompt_logprobs=TOP)
    (request,) = spec_engine.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
    mixture, _ = teacher(torch.tensor([prompt]))
    for position in range(1, len(prompt)):
        for token_id, logprob in request.prompt_logprobs[position].items():
            assert abs(logprob.logprob - mixture[0, position - 1, token_id].item()) < 1e-3, position
    assert len(request.outputs) == 2
    for output in request.outputs:  # each sample's log-probs are the mixture's after its own tokens
        check_generation(teacher, prompt, output, None)


def _gammaincc_p(statistic: float, dof: int) -> float:
    """Chi-square survival function (the p-value)."""
    return torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                   torch.tensor(statistic / 2, dtype=torch.float64)).item()


def _chi_square(counts: dict, probs: dict, samples: int) -> tuple[float, int]:
    """Pearson's statistic over the cells expected at least 5 times, the rest lumped into one."""
    big = {cell for cell, p in probs.items() if p * samples >= 5}
    statistic, rest_seen, rest_p = 0.0, samples, 1.0
    for cell in big:
        expected = probs[cell] * samples
        statistic += (counts.get(cell, 0) - expected) ** 2 / expected
        rest_seen -= counts.get(cell, 0)
        rest_p -= probs[cell]
    if rest_p * samples >= 5:
        statistic += (rest_seen - rest_p * samples) ** 2 / (rest_p * samples)
        return statistic, len(big)
    return statistic, len(big) - 1


def _pair_probs(teacher, prompt: list[int], second_of) -> dict[tuple[int, int], float]:
    """P(first two tokens) with the mixture's first token and ``second_of(sequence)`` ``(V,)`` for the second."""
    first = teacher(torch.tensor([prompt]))[0][0, -1].exp()  # (V,)
    probs = {}
    for token in (first > 1e-3).nonzero().flatten().tolist():
        second = second_of(torch.tensor([prompt + [token]]))
        for token2 in (second > 1e-4).nonzero().flatten().tolist():
            probs[(token, token2)] = (first[token] * second[token2]).item()
    return probs


def _spread_prompt(teacher, demo_paths, samples: int) -> list[int]:
    """Of a few real texts' openings, the one whose first two tokens fall in the most well-filled cells."""
    tokenizer = AutoTokenizer.from_pretrained(demo_paths.expert_dirs["code"])
    candidates = []
    for domain in demo_paths.expert_dirs:
        for text in load_split(demo_paths.root, domain, "eval")[:3]:
            candidates.append(tokenizer(text[:120], add_special_tokens=False).input_ids[:20])

    def mixture_second(sequence):
        return teacher(sequence)[0][0, -1].exp()

    def filled(prompt):
        return sum(p * samples >= 5 for p in _pair_probs(teacher, prompt, mixture_second).values())

    return max((c for c in candidates if len(c) >= 8), key=filled)


@pytest.mark.slow
@pytest.mark.xfail(on_cpu(), strict=True, reason=CPU_SAMPLING_WITH_DRAFT)
def test_sampled_pairs_follow_the_mixture_not_the_draft(spec_engine, teacher, demo_paths):
    """600 samples of the first two tokens at temperature 1: the second comes out of rejection sampling.

    Pearson's chi-square against the exact mixture must not reject (p > 0.001);
    against the same composite with the draft's own distribution for the second
    token it must, which shows that the test can fail. On vLLM 0.32's CPU
    backend it fails, with a plain model as target too: sampled requests are
    refused there (``spec_decode.CPU_SAMPLING_WITH_DRAFT``), and this strict
    xfail says when vLLM's CPU sampler becomes exact.
    """
    samples = 600
    prompt = _spread_prompt(teacher, demo_paths, samples)
    params = SamplingParams(max_tokens=2, temperature=1.0, ignore_eos=True)
    outputs = spec_engine.generate([{"prompt_token_ids": prompt}] * samples, params, use_tqdm=False)
    counts: dict[tuple[int, int], int] = {}
    for output in outputs:
        pair = tuple(output.outputs[0].token_ids)
        counts[pair] = counts.get(pair, 0) + 1
    draft_expert = teacher.experts[list(demo_paths.expert_dirs).index("code")]

    def mixture_second(sequence):
        return teacher(sequence)[0][0, -1].exp()

    def draft_second(sequence):
        with torch.no_grad():
            return torch.softmax(draft_expert(input_ids=sequence).logits[0, -1].float(), -1)

    statistic, dof = _chi_square(counts, _pair_probs(teacher, prompt, mixture_second), samples)
    assert dof >= 8, "the prompt should spread the pairs over many cells"
    assert _gammaincc_p(statistic, dof) > 1e-3, (statistic, dof)
    wrong, wrong_dof = _chi_square(counts, _pair_probs(teacher, prompt, draft_second), samples)
    assert _gammaincc_p(wrong, wrong_dof) < 1e-6, (wrong, wrong_dof)


@pytest.mark.slow
def test_logit_bias_is_refused_with_a_draft(spec_engine):
    with pytest.raises(VLLMValidationError, match="logit_bias"):
        spec_engine.generate(["x"], SamplingParams(max_tokens=1, logit_bias={5: 1.0}), use_tqdm=False)


@pytest.fixture(scope="module")
def context_teacher(context_composite, demo_paths):
    return EnsembleTeacher.load(context_composite, list(demo_paths.expert_dirs.values()))


@pytest.mark.slow
def test_a_random_draft_is_mostly_rejected_and_outputs_stay_exact(random_draft_engine, context_teacher, trace_socket):
    """The context-model router with a draft that knows nothing: exactness does not rest on the draft."""
    accepted = engine_counter(random_draft_engine, "vllm:spec_decode_num_accepted_tokens")
    drafted = engine_counter(random_draft_engine, "vllm:spec_decode_num_draft_tokens")
    _check_traced(context_teacher, random_draft_engine, token_prompts(5, 40), trace_socket, "random")
    accepted = engine_counter(random_draft_engine, "vllm:spec_decode_num_accepted_tokens") - accepted
    drafted = engine_counter(random_draft_engine, "vllm:spec_decode_num_draft_tokens") - drafted
    assert drafted > 0 and accepted / drafted < 0.3, (accepted, drafted)
