"""The primal-dual loop on a tiny fake world: invariants, resumption, plots."""

from __future__ import annotations

import itertools

import pytest
import torch

from gatemix.gate.fit.checkpoint import ResumeError
from gatemix.gate.fit.config import PrimalDualConfig
from gatemix.gate.fit.convergence import plot_history
from gatemix.gate.fit.game_data import GateFitData
from gatemix.gate.fit.primal_dual import run_primal_dual
from gatemix.gate.fit.sequence_gate import SequenceGate, SequenceGateForm


def _fake_data(per_domain: int = 24, length: int = 6, vocab: int = 20) -> GateFitData:
    """Two domains with distinct tokens; expert j is better on domain j."""
    generator = torch.Generator().manual_seed(0)
    domain = torch.arange(2).repeat_interleave(per_domain)
    input_ids = torch.randint(vocab // 2, (2 * per_domain, length), generator=generator)
    input_ids = input_ids + domain.unsqueeze(1) * (vocab // 2)
    own = -5.0 - torch.rand(2 * per_domain, generator=generator)
    other = own - 4.0
    expert_logprobs = torch.stack(
        [torch.where(domain == 0, own, other), torch.where(domain == 1, own, other)], dim=1
    )
    return GateFitData(
        {
            "domain": domain,
            "num_tokens": torch.full((2 * per_domain,), length - 1.0),
            "expert_sequence_logprobs": expert_logprobs,
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
        },
        num_domains=2,
        fingerprint="fake",
    )


def _gate() -> SequenceGate:
    torch.manual_seed(0)
    return SequenceGate(SequenceGateForm(20, 2, width=8, num_layers=1, num_heads=2, max_length=6))


def _config(**overrides) -> PrimalDualConfig:
    values = {
        "steps": 24,
        "batch_per_domain": 4,
        "learning_rate": 1e-2,
        "lambda_step": 0.5,
        "checkpoint_every": 5,
        "torch_threads": 1,
    }
    return PrimalDualConfig(**{**values, **overrides})


def test_lambda_stays_on_the_simplex_and_everything_is_recorded():
    result = run_primal_dual(_gate(), _fake_data(), _config(checkpoint_every=0))
    assert len(result.history["lambda"]) == 24
    for domain_lambda in result.history["lambda"]:
        assert min(domain_lambda) >= 0 and abs(sum(domain_lambda) - 1) < 1e-9
    assert abs(sum(result.lambda_avg) - 1) < 1e-9


def test_fixed_lambda_is_not_moved():
    result = run_primal_dual(
        _gate(), _fake_data(), _config(fixed_lambda=(0.25, 0.75), checkpoint_every=0)
    )
    assert all(domain_lambda == [0.25, 0.75] for domain_lambda in result.history["lambda"])


def test_an_interrupted_fit_resumes_to_the_uninterrupted_result(tmp_path):
    straight = run_primal_dual(_gate(), _fake_data(), _config(checkpoint_every=0))

    def interrupt(step: int, record: dict) -> None:
        if step == 12:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_primal_dual(_gate(), _fake_data(), _config(), work_dir=tmp_path, on_step=interrupt)
    resumed_gate = _gate()
    resumed = run_primal_dual(resumed_gate, _fake_data(), _config(), work_dir=tmp_path)
    assert resumed.resumed_from == 10
    torch.testing.assert_close(
        torch.tensor(resumed.history["lambda"]), torch.tensor(straight.history["lambda"])
    )
    assert resumed.history["mu"] == pytest.approx(straight.history["mu"])


def test_a_checkpoint_from_another_fit_is_refused(tmp_path):
    run_primal_dual(_gate(), _fake_data(), _config(steps=5), work_dir=tmp_path)
    with pytest.raises(ResumeError, match="other data or settings"):
        run_primal_dual(_gate(), _fake_data(), _config(steps=5, lambda_step=0.7), work_dir=tmp_path)


def test_history_plot_is_written(tmp_path):
    result = run_primal_dual(_gate(), _fake_data(), _config(steps=6, checkpoint_every=0))
    path = plot_history(result.history, tmp_path / "fit.png", ["a", "b"])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_config_range_checks():
    with pytest.raises(ValueError, match="lambda_smoothing"):
        PrimalDualConfig(lambda_smoothing=1.5)
    with pytest.raises(ValueError, match="loss"):
        PrimalDualConfig(loss="kl")
    with pytest.raises(ValueError, match="fixed_lambda"):
        PrimalDualConfig(fixed_lambda=(0.5, 0.6))


class _ConstantGate(torch.nn.Module):
    """A gate that ignores x: fixed weights (its parameter never moves at this lr)."""

    def __init__(self, weights: list[float]) -> None:
        super().__init__()
        self.log_weights = torch.nn.Parameter(torch.log(torch.tensor(weights)))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.log_weights, -1).expand(input_ids.shape[0], -1)


def test_z_is_estimated_on_the_q_pool_not_on_the_data_batch():
    # On the pool expert 0 owns every sequence, so pi_g/q = 2 g_0 = 1.6 exactly;
    # on the data batch (half each domain) the same gate would give 0.8 + 0.2 = 1.0.
    data = _fake_data()
    pool_size = 10
    pool_logprobs = torch.stack([torch.full((pool_size,), -5.0), torch.full((pool_size,), -60.0)], 1)
    data.proposal = {
        "expert_sequence_logprobs": pool_logprobs,
        "input_ids": torch.zeros(pool_size, 6, dtype=torch.long),
        "attention_mask": torch.ones(pool_size, 6, dtype=torch.long),
    }
    result = run_primal_dual(
        _ConstantGate([0.8, 0.2]), data, _config(learning_rate=1e-12, checkpoint_every=0)
    )
    assert result.history["z_batch"] == pytest.approx([1.6] * 24, rel=1e-5)
    data.proposal = None
    result = run_primal_dual(
        _ConstantGate([0.8, 0.2]), data, _config(learning_rate=1e-12, checkpoint_every=0)
    )
    assert all(abs(z - 1.6) > 0.1 for z in result.history["z_batch"])


def test_an_inconsistent_q_pool_is_refused():
    data = _fake_data()
    with pytest.raises(ValueError, match="proposal"):
        GateFitData(
            data.tensors,
            num_domains=2,
            proposal={"expert_sequence_logprobs": torch.zeros(3, 2), "input_ids": torch.zeros(4, 6)},
        )


def test_step_sizes_hold_then_decay_like_one_over_sqrt_t():
    from gatemix.gate.fit.convergence import schedule_factor

    config = _config(steps=100, schedule_scale=0.1)
    factors = [schedule_factor(step, config) for step in range(100)]
    assert factors[0] == 1.0 and all(a > b for a, b in itertools.pairwise(factors))
    assert factors[90] == pytest.approx(1 / (1 + 90 / 10) ** 0.5)
    assert schedule_factor(90, _config(step_schedule="constant")) == 1.0


def test_the_model_ends_at_the_average_of_its_iterates_after_the_burn_in():
    seen = []
    gate = _gate()

    def record(step: int, _record: dict) -> None:
        if step >= 12:  # average_from 0.5 of 24 steps
            seen.append({k: v.detach().clone() for k, v in gate.state_dict().items()})

    run_primal_dual(gate, _fake_data(), _config(checkpoint_every=0), on_step=record)
    expected = {k: torch.stack([state[k] for state in seen]).mean(0) for k in seen[0]}
    for name, value in gate.state_dict().items():
        torch.testing.assert_close(value, expected[name], atol=1e-6, rtol=0)


def test_lambda_is_held_during_its_warmup_then_moves():
    result = run_primal_dual(_gate(), _fake_data(), _config(checkpoint_every=0, lambda_warmup=0.25))
    assert all(row == [0.5, 0.5] for row in result.history["lambda"][:5])
    assert result.history["lambda"][-1] != [0.5, 0.5]


def test_the_final_duality_gap_has_a_lambda_side_and_a_best_response_side():
    result = run_primal_dual(_gate(), _fake_data(), _config(checkpoint_every=0, gap_every=6))
    gap = result.gap
    assert result.history["gap_step"] == [18, 24]  # once averaging has begun (step 12)
    assert gap.lambda_side >= 0 and gap.best_response_steps == 6  # a quarter of the steps
    assert gap.theta_side is not None and gap.total >= gap.lambda_side
    assert "duality gap" in gap.summary()
    assert max(gap.domain_losses) - sum(
        w * loss for w, loss in zip(result.lambda_avg, gap.domain_losses)) == pytest.approx(
        gap.lambda_side)


def test_the_duality_gap_shrinks_as_the_game_settles():
    """A constant gate from a skewed start against two domains: a convex game, lambda_bar -> 1/2."""
    gaps = {}
    for steps in (40, 160):
        result = run_primal_dual(
            _ConstantGate([0.9, 0.1]), _fake_data(),
            _config(steps=steps, checkpoint_every=0, gap_every=steps // 8, learning_rate=0.05,
                    lambda_step=0.5),
        )
        history = result.history["gap"]
        assert all(later < earlier for earlier, later in itertools.pairwise(history))
        gaps[steps] = result.gap.total
    assert gaps[160] < 0.25 * gaps[40]
