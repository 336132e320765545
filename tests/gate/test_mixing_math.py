"""Invariants of the pure mixture math shared by the engine and the offline fit."""

import math

import pytest
import torch

from gatemix.gate.mixing import (
    log_weights_from_probs,
    logsumexp,
    mix_logits,
    mix_logprobs,
    normalize_log_weights,
    restrict_log_weights,
)
from gatemix.gate.router import HiddenStateRouter, RouterForm, constant_router


def _expert_logprobs(batch=3, experts=4, vocab=11, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(batch, experts, vocab, generator=generator) * 3, dim=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("spread", [1.0, 95.0, 400.0])
def test_floored_logsumexp_equals_torchs_bit_for_bit(dtype, spread):
    """Far-apart terms (a posterior gate's log weights) as well as near ones, infinities included."""
    generator = torch.Generator().manual_seed(1)
    terms = (torch.randn(5, 3, 64, generator=generator) * 3
             - spread * torch.arange(3.0)[None, :, None]).to(dtype)  # (N, K, V)
    terms[0, :, 0] = float("-inf")  # every term -inf: -inf
    terms[1, 1:, 1] = float("-inf")  # some -inf
    terms[2, 0, 2] = float("inf")  # a +inf term: +inf
    expected = torch.logsumexp(terms, dim=-2)
    assert torch.equal(logsumexp(terms, dim=-2), expected)
    assert expected[0, 0] == float("-inf") and expected[2, 2] == float("inf")


def test_floored_logsumexp_has_torchs_gradient():
    terms = (torch.randn(4, 3, 16) - torch.tensor([0.0, 50.0, 120.0])[None, :, None]).double()
    ours, theirs = terms.clone().requires_grad_(), terms.clone().requires_grad_()
    logsumexp(ours, dim=-2).sum().backward()
    torch.logsumexp(theirs, dim=-2).sum().backward()
    torch.testing.assert_close(ours.grad, theirs.grad)


def test_mixture_normalizes():
    log_weights = normalize_log_weights(torch.randn(3, 4))
    mixed = mix_logprobs(_expert_logprobs(), log_weights)
    torch.testing.assert_close(mixed.exp().sum(-1), torch.ones(3))


def test_one_hot_weights_reproduce_the_expert():
    expert_logprobs = _expert_logprobs()
    for k in range(4):
        log_weights = log_weights_from_probs(torch.nn.functional.one_hot(torch.tensor([k] * 3), 4).float())
        torch.testing.assert_close(mix_logprobs(expert_logprobs, log_weights), expert_logprobs[:, k])


def test_mixture_equals_probability_space_sum():
    expert_logprobs = _expert_logprobs().double()
    weights = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    expected = torch.log((weights[None, :, None] * expert_logprobs.exp()).sum(1))
    torch.testing.assert_close(mix_logprobs(expert_logprobs, weights.log().expand(3, 4)), expected)


def test_expert_at_minus_inf_is_handled():
    expert_logprobs = _expert_logprobs()
    expert_logprobs[:, 0, 5] = -math.inf  # expert 0 gives token 5 no mass
    log_weights = normalize_log_weights(torch.zeros(3, 4))
    mixed = mix_logprobs(expert_logprobs, log_weights)
    assert torch.isfinite(mixed).all()
    # every expert at -inf on a token -> that token is -inf, never NaN
    expert_logprobs[:, :, 7] = -math.inf
    mixed = mix_logprobs(expert_logprobs, log_weights)
    assert torch.isneginf(mixed[:, 7]).all() and not torch.isnan(mixed).any()


def test_zero_weight_expert_contributes_nothing():
    expert_logprobs = _expert_logprobs()
    weights = torch.tensor([0.5, 0.5, 0.0, 0.0])
    mixed = mix_logprobs(expert_logprobs, log_weights_from_probs(weights).expand(3, 4))
    expected = mix_logprobs(expert_logprobs[:, :2], torch.log(torch.tensor([0.5, 0.5])).expand(3, 2))
    torch.testing.assert_close(mixed, expected)


def test_mix_logits_matches_mix_of_log_softmax():
    logits = torch.randn(2, 3, 7) * 5
    log_weights = normalize_log_weights(torch.randn(2, 3))
    torch.testing.assert_close(
        mix_logits(logits, log_weights), mix_logprobs(torch.log_softmax(logits, -1), log_weights)
    )


def test_fused_mix_logits_is_exact_at_the_edges():
    """Zero weights, one-hot weights, masked (-inf) logits and large logits, in float64."""
    logits = torch.randn(4, 3, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 30
    logits[0, 1, :10] = float("-inf")  # an expert that rules tokens out
    logits[3] += 1e3  # large shared offsets must cancel in the normalizer
    log_weights = log_weights_from_probs(
        torch.tensor(
            [[0.2, 0.3, 0.5], [0.5, 0.0, 0.5], [0.0, 1.0, 0.0], [1 / 3, 1 / 3, 1 / 3]],
            dtype=torch.float64,
        )
    )
    fused = mix_logits(logits, log_weights)
    reference = mix_logprobs(torch.log_softmax(logits.float(), -1), log_weights.float())
    assert not fused.isnan().any()
    torch.testing.assert_close(fused, reference, atol=1e-4, rtol=0)
    torch.testing.assert_close(fused[2], torch.log_softmax(logits[2, 1].float(), -1))
    assert torch.allclose(fused.exp().sum(-1), torch.ones(4), atol=1e-4)


@pytest.mark.parametrize("bad", [[-1.0, 2.0], [0.0, 0.0], [float("nan"), 1.0]])
def test_invalid_weights_are_refused(bad):
    with pytest.raises(ValueError):
        log_weights_from_probs(torch.tensor(bad))


def test_restriction_renormalizes_over_the_subset_and_never_dies():
    log_weights = torch.log(torch.tensor([[0.5, 0.3, 0.2], [1.0, 0.0, 0.0]]))
    mask = torch.tensor([False, True, True])
    restricted = restrict_log_weights(log_weights, mask)
    torch.testing.assert_close(restricted.exp()[0], torch.tensor([0.0, 0.6, 0.4]))
    # row 2 had all its mass outside the subset: uniform over the subset
    torch.testing.assert_close(restricted.exp()[1], torch.tensor([0.0, 0.5, 0.5]))


def test_router_outputs_lie_on_the_simplex():
    router = HiddenStateRouter(RouterForm(num_experts=3, hidden_size=8, router_hidden=5))
    log_weights = router(torch.randn(10, 24))
    assert log_weights.shape == (10, 3)
    torch.testing.assert_close(log_weights.exp().sum(-1), torch.ones(10))
    assert (log_weights.exp() >= 0).all()


def test_constant_router_ignores_its_input_and_keeps_zero_weights_zero():
    router = constant_router([0.7, 0.3, 0.0], hidden_size=4)
    weights = router(torch.randn(5, 12)).exp()
    torch.testing.assert_close(weights, torch.tensor([[0.7, 0.3, 0.0]]).expand(5, 3))
