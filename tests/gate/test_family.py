"""The gate family on tiny tensors: starting points, what each member trains, the game, the choice."""

from __future__ import annotations

import math

import pytest
import torch
from two_domains import HIDDEN, two_domain_features

from gatemix.gate.fit.config import PrimalDualConfig
from gatemix.gate.fit.family import fit_family, parameter_groups
from gatemix.gate.fit.inputs import fit_data
from gatemix.gate.fit.router_fit import routed_token_logprobs
from gatemix.gate.fit.selection import select_router
from gatemix.gate.mixing import mix_sequence_logprobs
from gatemix.gate.registry import GATE_FAMILY, GATES
from gatemix.gate.token_features import TokenFeatures


def _domain(index: int, sequences: int, length: int, seed: int) -> TokenFeatures:
    return two_domain_features(index, sequences, length, seed, gap=2.0)


def _config(**overrides) -> PrimalDualConfig:
    values = {"steps": 60, "batch_per_domain": 4, "learning_rate": 3e-2, "checkpoint_every": 0,
              "torch_threads": 1, "gap_every": 20, "gap_batch_per_domain": 8}
    return PrimalDualConfig(**{**values, **overrides})


def test_every_member_starts_at_uniform_or_at_the_bayes_posterior():
    features = _domain(0, 2, 6, 0)
    uniform = GATES["uniform"](2)(features)
    bayes = GATES["posterior"]()(features)
    for name, member in GATE_FAMILY.items():
        router = member.new_router([HIDDEN, HIDDEN])
        start = GATES[name](router)(features)
        # A learned forgetting starts at 1 - 9e-4: within a few hundredths of Bayes after 5 tokens.
        tolerance = 1e-5 if not member.train_forgetting or not member.posterior else 0.03
        torch.testing.assert_close(start, bayes if member.posterior else uniform,
                                   atol=tolerance, rtol=0)


def test_posterior_members_train_only_their_prior_and_forgetting():
    constant = GATE_FAMILY["minimax_constant"].new_router([HIDDEN, HIDDEN])
    learned = GATE_FAMILY["learned_posterior"].new_router([HIDDEN, HIDDEN])
    combined = GATE_FAMILY["posterior_router"].new_router([HIDDEN, HIDDEN])
    trained = lambda router: {n for n, p in router.named_parameters() if p.requires_grad}
    assert trained(constant) == {"prior_logits"} and float(constant.forgetting) == 1.0
    assert trained(learned) == {"prior_logits", "forgetting_raw"}
    assert {"prior_logits", "forgetting_raw", "proj_out.weight"} <= trained(combined)
    groups = parameter_groups(combined, posterior_learning_rate=0.05)
    posterior_group = next(g for g in groups if g.get("lr") == 0.05)
    assert posterior_group["weight_decay"] == 0.0 and len(posterior_group["params"]) == 2


def test_the_minimax_constant_member_is_the_sequence_level_constant_gate():
    """Forgetting 1 and prior sigma: the per-token mixture is exactly log sum_k sigma_k pi_k(x)."""
    features = _domain(1, 3, 7, 1)
    router = GATE_FAMILY["minimax_constant"].new_router([HIDDEN, HIDDEN])
    with torch.no_grad():
        router.prior_logits.copy_(torch.tensor([0.3, -0.4]))
        per_token = routed_token_logprobs(router, features.hidden, features.next_logprobs)
    log_sigma = torch.log_softmax(router.prior_logits.detach().double(), -1)
    sequence = mix_sequence_logprobs(features.sequence_logprobs().double(), log_sigma.expand(3, 2))
    torch.testing.assert_close(per_token.double().sum(1), sequence, atol=1e-4, rtol=0)  # float32 router


@pytest.fixture(scope="module")
def fitted_family():
    fit = {"a": _domain(0, 16, 6, 2), "b": _domain(1, 16, 6, 3)}
    held = {"a": _domain(0, 6, 6, 4), "b": _domain(1, 6, 6, 5)}
    routers, summaries, results = fit_family(fit_data(fit), [HIDDEN, HIDDEN], _config())
    return routers, summaries, results, held


def test_every_member_is_fitted_by_the_game_and_reports_its_gap(fitted_family):
    routers, summaries, results, _ = fitted_family
    assert list(routers) == list(GATE_FAMILY)
    for name, summary in summaries.items():
        assert abs(sum(summary["lambda_avg"]) - 1) < 1e-9
        assert summary["gap"]["total"] >= 0 and math.isfinite(summary["gap"]["total"])
        assert results[name].history["gap_step"] == [40, 60]  # checked once averaging began
    frozen = routers["learned_posterior"].proj_out.weight
    assert torch.equal(frozen, torch.zeros_like(frozen))  # the posterior alone: its head never moved
    assert summaries["minimax_constant"]["forgetting"] == 1.0


def test_the_member_with_the_lowest_held_out_worst_domain_excess_is_served(fitted_family):
    routers, _, _, held = fitted_family
    chosen, figures = select_router(routers, held)
    assert chosen == min(figures, key=lambda name: figures[name]["worst_excess"])
    # The hidden state says the domain here; a member that reads it must route better than
    # the uniform start, whose excess is log(1 / (0.5 + 0.5 e^-2)) = 0.566 nats/token.
    assert figures["hidden_state_router"]["worst_excess"] < 0.3
    assert figures[chosen]["worst_excess"] <= figures["hidden_state_router"]["worst_excess"]
