"""The posterior state on tiny tensors: the scan, its alignment, and the posterior router."""

from __future__ import annotations

import pytest
import torch

from gatemix.gate.posterior import SCAN_BLOCK, final_state, forgetting_scan, prefix_state
from gatemix.gate.registry import GATES
from gatemix.gate.router import HiddenStateRouter, RouterForm
from gatemix.gate.token_features import TokenFeatures


def _loop_scan(logprobs: torch.Tensor, forgetting: float, initial: torch.Tensor) -> torch.Tensor:
    state, out = initial.clone(), []
    for t in range(logprobs.shape[-2]):
        state = forgetting * state + logprobs[..., t, :]
        out.append(state)
    return torch.stack(out, dim=-2)


@pytest.mark.parametrize("forgetting", [1.0, 0.97, 0.5])
def test_the_blocked_scan_equals_the_step_by_step_recurrence(forgetting):
    generator = torch.Generator().manual_seed(0)
    logprobs = -torch.rand(2, SCAN_BLOCK * 2 + 37, 3, generator=generator, dtype=torch.float64)
    initial = -torch.rand(2, 3, generator=generator, dtype=torch.float64)
    expected = _loop_scan(logprobs, forgetting, initial)
    assert torch.allclose(forgetting_scan(logprobs, forgetting, initial), expected, atol=1e-10)


@pytest.mark.parametrize("forgetting", [1.0, 0.9])
def test_the_final_state_alone_is_the_scans_last_row(forgetting):
    """What a request continuing from cached blocks computes of its cached prefix."""
    generator = torch.Generator().manual_seed(2)
    logprobs = -5 * torch.rand(SCAN_BLOCK * 7, 3, generator=generator, dtype=torch.float64)
    expected = _loop_scan(logprobs, forgetting, torch.zeros(3, dtype=torch.float64))[-1]
    assert torch.allclose(final_state(logprobs, forgetting), expected, atol=1e-9)


def test_bayes_state_is_the_prefix_log_likelihood_before_each_prediction():
    """lambda = 1: the state at position t is log pi_k(x_1..x_t), what the registry's posterior uses."""
    generator = torch.Generator().manual_seed(1)
    next_logprobs = -torch.rand(3, 9, 2, generator=generator)
    state = prefix_state(next_logprobs, 1.0)
    assert torch.equal(state[:, 0], torch.zeros(3, 2))  # before the first prediction: the prior alone
    assert torch.allclose(state[:, 1:], next_logprobs.cumsum(1)[:, :-1], atol=1e-6)


def _features(num_experts: int = 3, hidden: int = 4) -> TokenFeatures:
    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(10, (2, 8), generator=generator)
    mask = torch.ones_like(ids)
    next_logprobs = torch.log_softmax(torch.randn(2, 7, num_experts, generator=generator), -1)
    states = torch.randn(2, 7, num_experts * hidden, generator=generator)
    return TokenFeatures(ids, mask, next_logprobs, states, torch.ones(2, 7))


def test_a_posterior_router_with_a_zero_head_is_the_posterior_with_its_prior():
    features = _features()
    router = HiddenStateRouter(RouterForm(3, 4, posterior=True))
    with torch.no_grad():
        router.proj_out.weight.zero_()
        router.proj_out.bias.zero_()
        router.prior_logits.copy_(torch.tensor([0.5, -1.0, 0.2]))
        router.forgetting_raw.fill_(-30.0)  # lambda = 1 up to 1e-13
    log_prior = torch.log_softmax(router.prior_logits.detach(), -1)
    expected = GATES["posterior"](log_prior)(features)
    assert torch.allclose(GATES["learned"](router)(features), expected, atol=1e-5)


def test_prior_forgetting_and_head_all_learn_through_the_posterior_router():
    features = _features()
    router = HiddenStateRouter(RouterForm(3, 4, posterior=True, posterior_features=True))
    log_weights = router(features.hidden, features.input_ids, None, features.next_logprobs)
    assert torch.allclose(log_weights.exp().sum(-1), torch.ones(2, 7), atol=1e-5)
    (log_weights[..., 0].sum()).backward()
    for name in ("prior_logits", "forgetting_raw", "proj_out.weight"):
        assert dict(router.named_parameters())[name].grad.abs().sum() > 0, name


def test_a_posterior_form_round_trips_and_an_old_form_keeps_its_dict():
    form = RouterForm(2, 8, posterior=True, posterior_features=True)
    assert RouterForm(**form.to_dict()) == form
    assert "posterior" not in RouterForm(2, 8).to_dict()  # artifacts written before keep their version
    with pytest.raises(ValueError, match="posterior_features needs posterior"):
        RouterForm(2, 8, posterior_features=True)
