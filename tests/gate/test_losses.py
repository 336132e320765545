"""Invariants of the primal-dual math on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch

from gatemix.gate.fit.losses import (
    domain_means,
    dual_ascent_step,
    eg_lambda_step,
    ema_update,
    estimate_normalizer,
    excess_loss,
    importance_log_ratios,
    log_uniform_mixture,
    project_to_prior_box,
)
from gatemix.gate.mixing import mix_sequence_logprobs


def test_excess_loss_is_zero_for_the_reference_and_per_token():
    reference = torch.tensor([-10.0, -40.0])
    tokens = torch.tensor([5.0, 20.0])
    assert torch.equal(excess_loss(reference, reference, tokens), torch.zeros(2))
    worse = reference - torch.tensor([5.0, 10.0])
    torch.testing.assert_close(excess_loss(worse, reference, tokens), torch.tensor([1.0, 0.5]))


def test_domain_means_averages_within_each_domain_and_flags_missing_ones():
    values = torch.tensor([1.0, 3.0, 10.0])
    means = domain_means(values, torch.tensor([0, 0, 2]), num_domains=3)
    assert means[0] == 2.0 and means[2] == 10.0 and math.isnan(means[1])


def test_eg_keeps_lambda_on_the_simplex_over_many_steps():
    generator = torch.Generator().manual_seed(0)
    domain_lambda = torch.full((4,), 0.25, dtype=torch.float64)
    for _ in range(2000):
        losses = torch.randn(4, generator=generator, dtype=torch.float64) * 5
        domain_lambda = eg_lambda_step(domain_lambda, losses, step_size=1.0, smoothing=1e-3)
        assert (domain_lambda >= 0).all()
        assert abs(float(domain_lambda.sum()) - 1) < 1e-9
    assert torch.isfinite(domain_lambda).all()


def test_eg_moves_mass_to_the_worst_domain():
    domain_lambda = torch.full((3,), 1 / 3, dtype=torch.float64)
    losses = torch.tensor([0.1, 0.5, 0.2], dtype=torch.float64)
    stepped = eg_lambda_step(domain_lambda, losses, step_size=1.0)
    assert stepped.argmax() == 1 and stepped[1] > 1 / 3 and stepped[0] < stepped[2] < 1 / 3
    for _ in range(200):
        domain_lambda = eg_lambda_step(domain_lambda, losses, step_size=1.0)
    assert domain_lambda[1] > 0.999


def test_eg_smoothing_keeps_every_domain_above_its_floor():
    domain_lambda = torch.tensor([1 / 3] * 3, dtype=torch.float64)
    for _ in range(100):
        domain_lambda = eg_lambda_step(
            domain_lambda, torch.tensor([9.0, 0.0, 0.0]), 1.0, smoothing=0.3
        )
    assert (domain_lambda >= 0.1 - 1e-12).all()
    uniform = eg_lambda_step(domain_lambda, torch.tensor([9.0, 0.0, 0.0]), 1.0, smoothing=1.0)
    torch.testing.assert_close(uniform, torch.full((3,), 1 / 3, dtype=torch.float64))


def test_projection_onto_a_prior_box_respects_the_bounds_and_the_simplex():
    lower = torch.tensor([0.2, 0.1, 0.0], dtype=torch.float64)
    upper = torch.tensor([1.0, 0.3, 0.5], dtype=torch.float64)
    projected = project_to_prior_box(torch.tensor([0.98, 0.01, 0.01]), lower, upper)
    assert abs(float(projected.sum()) - 1) < 1e-9
    assert (projected >= lower - 1e-9).all() and (projected <= upper + 1e-9).all()
    inside = torch.tensor([0.5, 0.2, 0.3], dtype=torch.float64)
    torch.testing.assert_close(project_to_prior_box(inside, lower, upper), inside)
    with pytest.raises(ValueError, match="empty prior region"):
        project_to_prior_box(inside, torch.tensor([0.6, 0.6, 0.0]))


def test_eg_with_a_prior_box_never_leaves_it():
    lower = torch.tensor([0.2, 0.2], dtype=torch.float64)
    domain_lambda = torch.tensor([0.5, 0.5], dtype=torch.float64)
    for _ in range(50):
        domain_lambda = eg_lambda_step(domain_lambda, torch.tensor([0.0, 3.0]), 1.0, lower=lower)
    torch.testing.assert_close(domain_lambda, torch.tensor([0.2, 0.8], dtype=torch.float64))


def test_dual_ascent_rises_when_z_exceeds_one_and_can_be_made_nonnegative():
    assert dual_ascent_step(0.0, 0.5, 0.1) == pytest.approx(0.05)
    assert dual_ascent_step(0.0, -0.5, 0.1) == pytest.approx(-0.05)
    assert dual_ascent_step(0.0, -0.5, 0.1, nonnegative=True) == 0.0


def test_ema_update_interpolates():
    assert ema_update(1.0, 3.0, 0.75) == pytest.approx(1.5)
    assert ema_update(1.0, 3.0, 0.0) == 3.0


def _discrete_world(num_points: int = 6, num_experts: int = 3, seed: int = 0):
    """Experts on a finite space of ``num_points`` "sequences", as log-probs (N, K)."""
    generator = torch.Generator().manual_seed(seed)
    expert_probs = torch.rand(num_points, num_experts, generator=generator, dtype=torch.float64)
    expert_probs = expert_probs / expert_probs.sum(0, keepdim=True)
    return expert_probs.log()


def test_z_of_any_constant_gate_is_exactly_one_in_expectation_under_q():
    expert_logprobs = _discrete_world()
    log_q = log_uniform_mixture(expert_logprobs)
    assert abs(float(log_q.exp().sum()) - 1) < 1e-12
    log_gate = torch.log(torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64)).expand(6, 3)
    ratios = importance_log_ratios(
        mix_sequence_logprobs(expert_logprobs, log_gate), expert_logprobs
    )
    assert abs(float((log_q.exp() * ratios.exp()).sum()) - 1) < 1e-12  # E_q[pi_g/q] exactly


def test_z_estimate_from_samples_of_q_is_near_one_for_a_constant_gate():
    expert_logprobs = _discrete_world()
    log_q = log_uniform_mixture(expert_logprobs)
    generator = torch.Generator().manual_seed(1)
    draws = torch.multinomial(log_q.exp(), 20000, replacement=True, generator=generator)
    sampled = expert_logprobs[draws]
    log_gate = torch.log(torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)).expand(len(draws), 3)
    z_hat = estimate_normalizer(mix_sequence_logprobs(sampled, log_gate), sampled)
    assert abs(float(z_hat) - 1) < 0.02


def test_the_cheating_gate_has_z_above_one_and_ratios_are_bounded_by_k():
    expert_logprobs = _discrete_world()
    cheating = torch.full_like(expert_logprobs, -torch.inf)
    cheating.scatter_(1, expert_logprobs.argmax(1, keepdim=True), 0.0)  # pick the likeliest expert
    ratios = importance_log_ratios(
        mix_sequence_logprobs(expert_logprobs, cheating), expert_logprobs
    )
    log_q = log_uniform_mixture(expert_logprobs)
    assert float((log_q.exp() * ratios.exp()).sum()) > 1.05
    assert (ratios <= math.log(3) + 1e-12).all()


def test_z_estimate_survives_very_long_sequences():
    expert_logprobs = torch.tensor([[-5000.0, -5003.0], [-7000.0, -6990.0]])
    log_gate = torch.log(torch.tensor([[0.5, 0.5], [0.5, 0.5]]))
    z_hat = estimate_normalizer(mix_sequence_logprobs(expert_logprobs, log_gate), expert_logprobs)
    torch.testing.assert_close(z_hat, torch.tensor(1.0))
