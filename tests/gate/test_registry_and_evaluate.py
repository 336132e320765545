"""The gate registry and the evaluation figures, on hand-made expert features."""

from __future__ import annotations

import math

import torch

from gatemix.gate.fit.evaluate import dirichlet_mixtures, evaluate_methods, write_report
from gatemix.gate.registry import GATES, gated_token_logprobs
from gatemix.gate.router import constant_router
from gatemix.gate.token_features import TokenFeatures


def _features(own: int, num: int = 3, length: int = 5, hidden: int = 4) -> TokenFeatures:
    """Two experts; expert ``own`` gives each token probability 0.9, the other 0.1."""
    probs = torch.full((num, length - 1, 2), 0.1)
    probs[..., own] = 0.9
    ids = torch.zeros(num, length, dtype=torch.long)
    return TokenFeatures(
        ids,
        torch.ones_like(ids),
        probs.log(),
        torch.randn(num, length - 1, 2 * hidden),
        torch.ones(num, length - 1),
    )


def test_registry_holds_the_baselines_the_learned_router_and_the_family():
    from gatemix.gate.registry import GATE_FAMILY

    assert {"uniform", "posterior", "robust_constant", "robust_constant_per_token",
            "learned"} <= set(GATES)
    assert set(GATE_FAMILY) <= set(GATES)
    features = _features(0)
    for gate in (
        GATES["uniform"](2),
        GATES["posterior"](),
        GATES["robust_constant"]([0.3, 0.1]),
        GATES["robust_constant_per_token"]([0.3, 0.1]),
        GATES["learned"](constant_router([0.2, 0.8], hidden_size=4)),
    ):
        log_weights = gate(features)
        assert log_weights.shape == (3, 4, 2)
        torch.testing.assert_close(log_weights.exp().sum(-1), torch.ones(3, 4))


def test_one_hot_learned_gate_reproduces_the_expert_and_uniform_mixes():
    features = _features(0)
    one_hot = GATES["learned"](constant_router([1.0, 0.0], hidden_size=4))
    torch.testing.assert_close(
        gated_token_logprobs(one_hot, features), features.next_logprobs[..., 0]
    )
    uniform = gated_token_logprobs(GATES["uniform"](2), features)
    torch.testing.assert_close(uniform, torch.full((3, 4), math.log(0.5)))


def test_posterior_moves_to_the_expert_that_explains_the_prefix():
    weights = GATES["posterior"]()(_features(1)).exp()
    torch.testing.assert_close(weights[:, 0], torch.full((3, 2), 0.5))  # no prefix yet
    assert (weights[:, 1:, 1].diff(dim=-1) > 0).all() and (weights[:, -1, 1] > 0.99).all()


def test_robust_constant_weights_follow_exp_epsilon():
    weights = GATES["robust_constant"]([math.log(3.0), 0.0])(_features(0))[0, 0].exp()
    torch.testing.assert_close(weights, torch.tensor([0.75, 0.25]))


def test_the_robust_constant_gate_is_sequence_level_and_the_per_token_one_is_kept_apart():
    """sigma ∝ exp(eps) as the paper's pi_sigma (the posterior with prior sigma), and the
    per-token mixture with fixed weights sigma under its own name."""
    features = _features(1)
    epsilons = [math.log(3.0), 0.0]
    sequence_level = GATES["robust_constant"](epsilons)(features)
    prior = torch.log(torch.tensor([0.75, 0.25]))
    torch.testing.assert_close(sequence_level, GATES["posterior"](prior)(features))
    mixed = gated_token_logprobs(GATES["robust_constant"](epsilons), features).sum(1)
    torch.testing.assert_close(mixed, torch.logsumexp(features.sequence_logprobs() + prior, -1))
    per_token = GATES["robust_constant_per_token"](epsilons)(features).exp()
    torch.testing.assert_close(per_token, torch.tensor([0.75, 0.25]).expand(3, 4, 2))


def test_evaluation_reports_excess_worst_domain_and_dirichlet_curve(tmp_path):
    eval_features = {"a": _features(0), "b": _features(1)}
    report = evaluate_methods(eval_features, {"uniform": GATES["uniform"](2)}, num_mixtures=50)
    expert_a, uniform = report.methods["expert:a"], report.methods["uniform"]
    assert abs(expert_a.excess[0]) < 1e-6 and math.isclose(
        expert_a.excess[1], math.log(9), rel_tol=1e-5
    )
    assert expert_a.worst_domain == "b"
    expected = math.log(0.9) - math.log(0.5)
    assert all(math.isclose(value, expected, rel_tol=1e-5) for value in uniform.excess)
    assert math.isclose(uniform.dirichlet_worst, expected, rel_tol=1e-5)
    assert expert_a.dirichlet_p90 <= expert_a.dirichlet_worst <= math.log(9) + 1e-6
    path = write_report(report, tmp_path)
    assert "| uniform |" in path.read_text() and (tmp_path / "excess.png").is_file()


def test_dirichlet_mixtures_are_on_the_simplex_and_seeded():
    mixtures = dirichlet_mixtures(3, 200, seed=1)
    assert mixtures.shape == (200, 3) and (mixtures >= 0).all()
    torch.testing.assert_close(mixtures.sum(1), torch.ones(200, dtype=torch.float64))
    torch.testing.assert_close(mixtures, dirichlet_mixtures(3, 200, seed=1))


def test_a_baseline_that_beats_the_experts_themselves_is_explained():
    from gatemix.gate.fit.evaluate import EvaluationReport, MethodScore, compare_to_baselines

    def score(excess: list[float]) -> MethodScore:
        worst = max(excess)
        return MethodScore([3.0, 3.0], excess, "a", worst, 3.0, worst, worst)

    report = EvaluationReport(domains=["a", "b"])
    report.methods = {
        "robust_router": score([0.05, 0.04]),
        "monolithic": score([-0.3, -0.1]),
        "erm": score([0.045, 0.04]),
    }
    notes = compare_to_baselines(report, "robust_router")
    monolithic = [n for n in notes if n.startswith("monolithic beats")]
    assert monolithic and all("in-domain expert itself on a, b, by 0.10 to 0.30" in n for n in monolithic)
    erm = [n for n in notes if n.startswith("erm beats")]
    assert erm and all("small gap: 0.0050" in n for n in erm)
