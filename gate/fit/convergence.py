"""What makes the stochastic primal-dual game settle, and the check that it did.

The game is convex in the gate's mixture and linear in lambda, so the theory's
guarantee (``O(1/sqrt(T))``) is for the *averaged* iterates under step sizes
that decay like ``1/sqrt(t)``; the last iterate of a constant-step game keeps
oscillating (on the full demo lambda swung 0.1-0.9 to the end). Hence:

- ``schedule_factor``: one multiplier of theta's learning rate and of the
  lambda and mu steps, constant for a short while, then ``1/sqrt(t)``;
- ``ParameterAverage``: the uniform average of theta's iterates after the burn-in;
- the duality gap of the averaged pair ``(theta_bar, lambda_bar)``:
  ``max_lambda L(lambda, theta_bar) - min_theta L(lambda_bar, theta)``. Its lambda
  side is exact and cheap (lambda's best response is the worst domain), so it is
  checked during the fit; its theta side needs a best response to ``lambda_bar``,
  a short fit with lambda and mu frozen, so it is run once at the end. A
  best response found by SGD is only an upper bound on the minimum, so the
  reported gap is a lower estimate of the true one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from gatemix.gate.fit.config import PrimalDualConfig


def schedule_factor(step: int, config: PrimalDualConfig) -> float:
    """Multiplier of every step size at ``step`` (0-based): 1, then ``1/sqrt(1 + t/t0)``."""
    if config.step_schedule == "constant":
        return 1.0
    scale = max(1.0, config.schedule_scale * config.steps)
    return 1.0 / math.sqrt(1.0 + step / scale)


def averaging_start(config: PrimalDualConfig) -> int:
    """The first step whose iterates enter the averages."""
    return min(int(config.average_from * config.steps), config.steps - 1)


class ParameterAverage:
    """Uniform running mean of a module's floating-point state, from the burn-in on."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: dict[str, torch.Tensor] = {}

    def update(self, model: nn.Module) -> None:
        self.count += 1
        for name, value in model.state_dict().items():
            if not value.is_floating_point():
                continue
            value = value.detach().double()
            if name not in self.mean:
                self.mean[name] = value.clone()
            else:
                self.mean[name] += (value - self.mean[name]) / self.count

    def copy_into(self, model: nn.Module) -> nn.Module:
        """Load the average into ``model`` (in place); a no-op before the first update."""
        if self.count:
            state = model.state_dict()
            model.load_state_dict(
                {name: self.mean[name].to(value.dtype) if name in self.mean else value
                 for name, value in state.items()}
            )
        return model

    def state(self) -> dict:
        return {"count": self.count, "mean": self.mean}

    @classmethod
    def from_state(cls, state: dict) -> ParameterAverage:
        average = cls()
        average.count, average.mean = state["count"], state["mean"]
        return average


def lambda_side_gap(domain_losses: torch.Tensor, domain_lambda: torch.Tensor) -> float:
    """``max_j L_j - sum_j lambda_j L_j`` >= 0: how far lambda is from a best response to theta."""
    losses = domain_losses.double()
    return float(losses.max() - (domain_lambda.double() * losses).sum())


@dataclass
class DualityGap:
    """The final check of the averaged iterates, in nats per token (the losses' unit)."""

    lambda_side: float  # max_j L_j(theta_bar) - L(lambda_bar, theta_bar)
    theta_side: float | None  # L(lambda_bar, theta_bar) - L(lambda_bar, theta_br) (+ the mu terms)
    domain_losses: list[float]  # L_j(theta_bar) on the gap batch
    best_response_losses: list[float] | None = None
    z_avg_model: float = 1.0  # Z of theta_bar (1 for a normalized model)
    z_best_response: float | None = None
    best_response_steps: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return self.lambda_side + max(0.0, self.theta_side or 0.0)

    def to_dict(self) -> dict:
        return {**vars(self), "total": self.total}

    def summary(self) -> str:
        theta = "not checked" if self.theta_side is None else f"{self.theta_side:+.4f}"
        return (f"duality gap {self.total:.4f} nats/token (lambda side {self.lambda_side:.4f}, "
                f"theta side {theta} from a {self.best_response_steps}-step best response)")


def running_average(values: torch.Tensor, first: int) -> torch.Tensor:
    """``(T, ...)`` iterates -> the mean of rows ``first..t`` at every ``t >= first`` (NaN before)."""
    values = values.double()
    out = torch.full_like(values, float("nan"))
    tail = values[first:]
    counts = torch.arange(1, len(tail) + 1, dtype=torch.float64).view(-1, *([1] * (values.dim() - 1)))
    out[first:] = tail.cumsum(0) / counts
    return out


def plot_history(
    history: dict[str, list],
    path: str | Path,
    domain_names: list[str],
    average_from: float = 0.5,
    gap: DualityGap | None = None,
) -> Path:
    """lambda, mu, Z_g (iterates faint, their running averages bold) and the duality gap, one PNG."""
    # matplotlib is deferred: it is slow to import and only the plots need it.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = len(history["mu"])
    first = min(int(average_from * steps), max(steps - 1, 0))
    # A per-token mixture is normalized by construction: no mu, no Z to show.
    constrained = any(history["mu"]) or any(z != 1.0 for z in history["z_batch"])
    figure, axes = plt.subplots(1, 4 if constrained else 2, figsize=(17 if constrained else 9, 3.6))
    if not constrained:
        axes = [axes[0], None, None, axes[1]]
    lambdas = torch.tensor(history["lambda"], dtype=torch.float64)  # (T, D)
    averaged = running_average(lambdas, first)
    for index, name in enumerate(domain_names):
        line = axes[0].plot(lambdas[:, index].numpy(), alpha=0.3, linewidth=0.8)[0]
        axes[0].plot(averaged[:, index].numpy(), color=line.get_color(), linewidth=2, label=name)
    axes[0].set(title="lambda (faint: iterates, bold: average)", xlabel="step", ylim=(0, 1))
    axes[0].legend()
    if constrained:
        _plot_mu_and_z(axes[1], axes[2], history, first)
    if history.get("gap"):
        axes[3].semilogy(history["gap_step"], [max(g, 1e-5) for g in history["gap"]], marker=".",
                         label="lambda side (averaged iterates)")
    if gap is not None:
        axes[3].axhline(max(gap.total, 1e-5), color="black", linestyle="--",
                        label=f"final gap {gap.total:.4f}")
    axes[3].set(title="duality gap (nats/token)", xlabel="step")
    if history.get("gap") or gap is not None:
        axes[3].legend()
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _plot_mu_and_z(mu_axis, z_axis, history: dict[str, list], first: int) -> None:
    mu = torch.tensor(history["mu"], dtype=torch.float64)
    mu_axis.plot(mu.numpy(), alpha=0.4, linewidth=0.8, label="iterate")
    mu_axis.plot(running_average(mu, first).numpy(), linewidth=2, label="average")
    mu_axis.set(title="mu (normalization multiplier)", xlabel="step")
    mu_axis.legend()
    z_axis.plot(history["z_batch"], alpha=0.2, label="batch estimate")
    z_axis.plot(history["z_ema"], alpha=0.6, label="EMA")
    z_ema = torch.tensor(history["z_ema"], dtype=torch.float64)
    z_axis.plot(running_average(z_ema, first).numpy(), linewidth=2, label="average")
    z_axis.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    z_axis.set(title="Z_g (importance-sampling estimate)", xlabel="step")
    z_axis.legend()


SEQUENCE_GATE_PLOT = "primal_dual.png"  # the sequence gate's game, in the fit's work dir


def member_plot_file(name: str) -> str:
    """The plot of one family member's game, beside the sequence gate's."""
    return f"primal_dual_{name}.png"
