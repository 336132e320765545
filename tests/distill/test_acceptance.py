"""The student as a draft: acceptance probability, greedy agreement and expected accepted length."""

import math

import pytest
import torch

from gatemix.distill.acceptance import (
    AcceptanceTally,
    acceptance_probability,
    expected_accept_lengths,
    greedy_agreement,
    mean_accept_length,
)


def _logprobs(seed, shape=(2, 5, 6), scale=2.0):
    logits = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale
    return torch.log_softmax(logits, -1)


def _log(probs):
    return torch.tensor(probs, dtype=torch.float64).log()


@pytest.mark.parametrize("draft_tokens", [1, 3, 5])
def test_identical_distributions_accept_everything(draft_tokens):
    logprobs = _logprobs(0)
    alpha = acceptance_probability(logprobs, logprobs)
    torch.testing.assert_close(alpha, torch.ones(2, 5))
    assert greedy_agreement(logprobs, logprobs).eq(1).all()
    lengths = expected_accept_lengths(alpha, draft_tokens)
    assert lengths.shape == (2, 5 - draft_tokens + 1)
    torch.testing.assert_close(lengths, torch.full_like(lengths, draft_tokens + 1.0))


def test_disjoint_supports_accept_nothing():
    target = _log([[[0.5, 0.5, 0.0, 0.0]] * 4])  # (1, 4, 4), -inf on tokens 2 and 3
    draft = _log([[[0.0, 0.0, 0.3, 0.7]] * 4])
    alpha = acceptance_probability(target, draft)
    assert alpha.eq(0).all() and not alpha.isnan().any()
    assert greedy_agreement(target, draft).eq(0).all()
    assert mean_accept_length(alpha, 3) == 1.0


def test_a_hand_computed_case():
    # position 0: min(.6,.2) + min(.4,.3) + 0 = .5, argmax 0 vs 2; position 1: p = q;
    # position 2: min(1,.25) = .25, argmax 0 vs 1
    target = _log([[[0.6, 0.4, 0.0], [0.1, 0.2, 0.7], [1.0, 0.0, 0.0]]])
    draft = _log([[[0.2, 0.3, 0.5], [0.1, 0.2, 0.7], [0.25, 0.75, 0.0]]])
    alpha = acceptance_probability(target, draft)
    torch.testing.assert_close(alpha, torch.tensor([[0.5, 1.0, 0.25]], dtype=torch.float32))
    greedy = greedy_agreement(target, draft)
    assert greedy.tolist() == [[0.0, 1.0, 0.0]]
    # N = 2: from 0, 1 + .5 + .5 * 1 = 2; from 1, 1 + 1 + 1 * .25 = 2.25 (position 2 has no room)
    torch.testing.assert_close(expected_accept_lengths(alpha, 2), torch.tensor([[2.0, 2.25]]))
    assert mean_accept_length(alpha, 2) == pytest.approx(2.125)
    assert expected_accept_lengths(greedy, 2).tolist() == [[1.0, 2.0]]
    assert expected_accept_lengths(alpha, 4).shape == (1, 0)


def _simulate_steps(target: torch.Tensor, draft: torch.Tensor, draft_tokens: int, trials: int,
                    generator: torch.Generator) -> torch.Tensor:
    """Speculative sampling by rejection, ``trials`` steps from every start: ``(T, V)`` -> ``(T-N+1,)``.

    Each position's distributions do not depend on the tokens before it, which
    is the independence the formula assumes, so the two must agree.
    """
    means = []
    for start in range(target.shape[0] - draft_tokens + 1):
        alive = torch.ones(trials, dtype=torch.bool)
        accepted = torch.zeros(trials)
        for offset in range(draft_tokens):
            p, q = target[start + offset], draft[start + offset]
            tokens = torch.multinomial(q, trials, replacement=True, generator=generator)
            keep = torch.rand(trials, generator=generator) < (p[tokens] / q[tokens]).clamp(max=1)
            alive &= keep
            accepted += alive.float()
        means.append(1 + accepted.mean())
    return torch.stack(means)


def test_expected_length_matches_a_monte_carlo_simulation_of_rejection_sampling():
    target, draft = _logprobs(1, (1, 6, 4), 1.5), _logprobs(2, (1, 6, 4), 1.5)
    draft_tokens, trials = 3, 40_000
    simulated = _simulate_steps(target[0].exp(), draft[0].exp(), draft_tokens, trials,
                                torch.Generator().manual_seed(0))
    expected = expected_accept_lengths(acceptance_probability(target, draft), draft_tokens)[0]
    # A step's length lies in [1, N + 1], so its standard deviation is at most N / 2 and the
    # mean of `trials` steps is within 4 standard errors with probability > 0.9999.
    tolerance = 4 * (draft_tokens / 2) / math.sqrt(trials)
    assert (simulated - expected).abs().max() < tolerance, (simulated, expected)
    # the check has teeth: the lengths are far from both ends, and differ between starts
    assert 1.3 < expected.min() and expected.max() < draft_tokens + 0.7


def test_the_tally_aggregates_batches_into_the_mean_over_all_positions():
    target, draft = _logprobs(3, (4, 7, 5)), _logprobs(4, (4, 7, 5))
    tally = AcceptanceTally(draft_tokens=3)
    tally.add("code", target[:1], draft[:1])
    tally.add("code", target[1:], draft[1:])
    tally.add("legal", target, target)
    means = tally.means()
    alpha = acceptance_probability(target, draft)
    assert means["code"]["acceptance"] == pytest.approx(float(alpha.mean()), rel=1e-6)
    assert means["code"]["accept_length"] == pytest.approx(mean_accept_length(alpha, 3), rel=1e-6)
    assert means["code"]["greedy_agreement"] == pytest.approx(
        float(greedy_agreement(target, draft).mean()))
    assert means["legal"] == pytest.approx({"acceptance": 1.0, "greedy_agreement": 1.0,
                                            "accept_length": 4.0, "greedy_accept_length": 4.0})
