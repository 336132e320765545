"""Invariants of the lockstep baseline's mixing: top-20 lists completed with a tail bucket."""

import math

import pytest
import torch

from gatemix.bench.lockstep_server import choose_token, complete_top_logprobs, mix_top_logprobs
from gatemix.gate.mixing import log_weights_from_probs

VOCAB = 50


def _top_logprobs(seed: int, k: int = 20) -> dict[int, float]:
    """An expert's top-k, as a vLLM server reports it: token id -> log-prob of the full distribution."""
    generator = torch.Generator().manual_seed(seed)
    logprobs = torch.log_softmax(torch.randn(VOCAB, generator=generator) * 2, dim=-1)
    values, ids = logprobs.topk(k)
    return dict(zip(ids.tolist(), values.tolist()))


def test_completed_expert_normalizes_and_keeps_its_top_k():
    top = _top_logprobs(0)
    dense = complete_top_logprobs(top, VOCAB)
    assert dense.exp().sum().item() == pytest.approx(1.0, abs=1e-6)
    for token, logprob in top.items():
        assert dense[token].item() == pytest.approx(logprob)


def test_tail_bucket_spreads_the_leftover_evenly_below_the_top_k():
    top = _top_logprobs(1)
    dense = complete_top_logprobs(top, VOCAB)
    tail = [t for t in range(VOCAB) if t not in top]
    leftover = 1.0 - sum(math.exp(v) for v in top.values())
    assert torch.allclose(dense[tail].exp(), torch.full((len(tail),), leftover / len(tail), dtype=torch.float64))
    assert dense[tail].max() <= min(top.values())  # so greedy never picks a tail token of one expert


def test_no_leftover_leaves_the_tail_at_minus_infinity():
    dense = complete_top_logprobs({3: math.log(0.5), 7: math.log(0.5)}, VOCAB)
    assert torch.isinf(dense[0]) and dense[0] < 0
    assert dense.exp().sum().item() == pytest.approx(1.0)


def test_mixture_normalizes():
    tops = [_top_logprobs(seed) for seed in range(3)]
    mixture = mix_top_logprobs(tops, log_weights_from_probs(torch.tensor([0.2, 0.3, 0.5])), VOCAB)
    assert mixture.shape == (VOCAB,)
    assert mixture.exp().sum().item() == pytest.approx(1.0, abs=1e-6)


def test_identical_experts_reproduce_the_expert_top_k():
    top = _top_logprobs(2)
    mixture = mix_top_logprobs([top, top, top], log_weights_from_probs(torch.tensor([0.5, 0.3, 0.2])), VOCAB)
    values, ids = mixture.topk(20)
    assert dict(zip(ids.tolist(), values.tolist())) == pytest.approx(top)


def test_one_hot_weights_reproduce_that_expert():
    tops = [_top_logprobs(seed) for seed in range(3)]
    for k in range(3):
        one_hot = log_weights_from_probs(torch.nn.functional.one_hot(torch.tensor(k), 3).double())
        mixture = mix_top_logprobs(tops, one_hot, VOCAB)
        torch.testing.assert_close(mixture, complete_top_logprobs(tops[k], VOCAB))
        assert choose_token(mixture, 0.0, None) == max(tops[k], key=tops[k].get)


def test_greedy_picks_the_mixture_argmax_and_sampling_follows_the_seed():
    tops = [_top_logprobs(seed) for seed in range(2)]
    mixture = mix_top_logprobs(tops, log_weights_from_probs(torch.tensor([0.5, 0.5])), VOCAB)
    assert choose_token(mixture, 0.0, None) == int(mixture.argmax())
    draws = [choose_token(mixture, 1.0, torch.Generator().manual_seed(7)) for _ in range(2)]
    assert draws[0] == draws[1]
