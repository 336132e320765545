"""The paper's synthetic experiment (vocab 100, x+1 vs x-1) as a test.

One run trains the experts, the monolithic model, the robust gate and its
router (about 25 s on one CPU thread); the tests check its figures. KL values
are exact (all 200 sequences enumerated), in nats per sequence of 7 scored tokens.
"""

from __future__ import annotations

import math

import pytest
import torch

from gatemix.gate.fit.synthetic import SyntheticResult, run_synthetic_experiment


@pytest.fixture(scope="module")
def result() -> SyntheticResult:
    return run_synthetic_experiment()


def _at(result: SyntheticResult, method: str, lam: float) -> float:
    return result.kl[method][result.lambdas.index(lam)]


def test_primal_dual_lambda_converges_to_the_middle_and_z_to_one(result):
    assert all(abs(value - 0.5) < 0.05 for value in result.lambda_avg)
    assert abs(result.z_avg - 1) < 0.05


def test_the_duality_gap_shrinks_and_the_averaged_iterates_settle(result):
    from gatemix.gate.fit.convergence import running_average

    # Checked once averaging has begun, the gap stays near zero (the losses are ~0.1 nats/token);
    # that it shrinks as the game runs is tests/gate/test_primal_dual.py's convex toy.
    gaps = result.history["gap"]
    assert len(gaps) >= 2 and all(0 <= gap < 0.005 for gap in gaps)
    assert 0 <= result.gap["total"] < 0.005  # nats/token, lambda side plus best-response side
    first = len(result.history["mu"]) // 2  # where averaging starts
    last_quarter = slice(int(0.75 * len(result.history["mu"])), None)
    for name in ("lambda", "mu", "z_ema"):
        values = torch.tensor(result.history[name], dtype=torch.float64)
        settled = running_average(values, first)[last_quarter]
        assert float((settled.max(0).values - settled.min(0).values).max()) < 0.1, name


def test_experts_are_good_in_domain_and_useless_out_of_domain(result):
    assert _at(result, "expert_a", 1.0) < 0.05 and _at(result, "expert_b", 0.0) < 0.05
    assert _at(result, "expert_a", 0.0) > 10 and _at(result, "expert_b", 1.0) > 10


def test_the_robust_gate_reaches_the_minimax_value(result):
    # For disjoint domains no model has a worst case below log 2 (it must split its mass).
    assert max(result.kl["gate"]) < math.log(2) + 0.05
    assert _at(result, "gate", 0.5) < 0.05


def test_near_the_middle_the_gate_beats_the_monolithic_model(result):
    assert _at(result, "gate", 0.5) < _at(result, "monolithic", 0.5)


def test_the_router_reads_context_where_static_per_token_weights_cannot(result):
    # Fixed per-token weights pay log 2 at every token after the first; the router must not.
    assert _at(result, "uniform_per_token", 0.5) > 6 * math.log(2) - 0.1
    assert max(result.kl["router"]) < 0.5 * max(result.kl["uniform_per_token"])
    assert _at(result, "router", 0.5) < 0.5


def test_distillation_samples_the_robust_model_at_the_expected_rate(result):
    # pi_g / (K q) averages 1/K = 0.5 when the gate is close to constant.
    assert abs(result.router_fit["sampling"]["acceptance"] - 0.5) < 0.05


@pytest.mark.xfail(
    strict=True,
    reason=(
        "not reproduced: the monolithic model (1 layer, width 28) learns both rules and sits at "
        "the minimax floor log 2 = 0.693 (worst 0.718); the gate is there too (0.717), and the "
        "router distilled from it is 0.04-0.08 above (0.75-0.76), so it cannot be strictly below"
    ),
)
def test_router_worst_case_is_below_the_monolithic_models(result):
    assert max(result.kl["router"]) < max(result.kl["monolithic"])


def test_router_nearly_matches_the_robust_gate(result):
    assert max(abs(r - g) for r, g in zip(result.kl["router"], result.kl["gate"])) < 0.1
