"""The causal router's training pieces: lambda-weighted real data, held-out selection, router choice."""

from __future__ import annotations

import math

import pytest
import torch
from two_domains import HIDDEN, two_domain_features

from gatemix.gate.fit.router_fit import lambda_weighted_data, train_router
from gatemix.gate.fit.selection import select_router, split_for_selection
from gatemix.gate.router import HiddenStateRouter, RouterForm, constant_router
from gatemix.gate.token_features import TokenFeatures


def _domain(index: int, sequences: int, length: int, seed: int) -> TokenFeatures:
    return two_domain_features(index, sequences, length, seed, gap=3.0)


def test_lambda_weighted_data_gives_each_domain_its_lambda_share_of_the_loss():
    parts = [_domain(0, 3, 5, 0), _domain(1, 9, 7, 1)]
    features, weights = lambda_weighted_data(parts, [0.25, 0.75])
    tokens = features.token_mask.sum(1)
    shares = [float((weights * tokens)[:3].sum()), float((weights * tokens)[3:].sum())]
    assert shares == pytest.approx([0.25, 0.75])
    with pytest.raises(ValueError):
        lambda_weighted_data(parts, [1.0])


def test_router_training_learns_to_route_and_keeps_its_best_held_out_step():
    features = TokenFeatures.concat([_domain(0, 16, 6, 2), _domain(1, 16, 6, 3)])
    router = HiddenStateRouter(RouterForm(2, HIDDEN)).set_constant(torch.ones(2))
    losses, held_out = train_router(
        router, features, steps=60, batch_size=8, learning_rate=5e-2, holdout_fraction=0.25
    )
    assert len(losses) == 60 and 1 <= held_out["step"] <= 60
    # Uniform weights cost about log 2 per token over the sharp expert; routing removes most of it.
    uniform_nll = 1.05 + math.log(2)
    assert held_out["held_out_nll"] < uniform_nll - 0.4
    with torch.no_grad():
        weights = router(features.hidden[:16]).exp()[..., 0]  # domain-0 tokens
    assert float(weights.mean()) > 0.8


def test_selection_split_is_disjoint_seeded_and_leaves_every_domain_both_parts():
    features = {"a": _domain(0, 10, 4, 4), "b": _domain(1, 3, 4, 5)}
    fit, held = split_for_selection(features, 0.2, seed=7)
    again, _ = split_for_selection(features, 0.2, seed=7)
    for name in features:
        assert fit[name].input_ids.shape[0] + held[name].input_ids.shape[0] == features[name].input_ids.shape[0]
        assert held[name].input_ids.shape[0] >= 1 and fit[name].input_ids.shape[0] >= 1
        assert torch.equal(fit[name].next_logprobs, again[name].next_logprobs)
    assert held["a"].input_ids.shape[0] == 2
    assert split_for_selection(features, 0.0, seed=7) == (features, None)


def test_select_router_picks_the_lower_worst_domain_excess():
    held = {"a": _domain(0, 4, 5, 6), "b": _domain(1, 4, 5, 7)}
    candidates = {
        "one_hot": constant_router([1.0, 0.0], HIDDEN),  # perfect on a, hopeless on b
        "uniform": constant_router([0.5, 0.5], HIDDEN),  # log 2 short of the best everywhere
    }
    chosen, figures = select_router(candidates, held)
    assert chosen == "uniform"
    assert figures["uniform"]["worst_excess"] == pytest.approx(math.log(2), abs=0.06)
    assert figures["one_hot"]["excess"]["b"] > 2.5
