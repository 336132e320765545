"""The stochastic primal-dual loop of the robust gate, with checkpoints that resume.

Each step samples ``batch_per_domain`` sequences from every domain, computes
the model's sequence log-probs on them, and then

- theta: one AdamW step on ``sum_j lambda_j L_j(theta) + mu (Z_hat - 1)``;
- lambda: one exponentiated-gradient step on the per-domain losses;
- mu: one dual-ascent step on ``Z_ema - 1``.

All three step sizes follow one schedule (``1/sqrt(t)`` after a short
plateau), the parameters and the multipliers are averaged after the burn-in,
and the averaged pair's duality gap is checked along the way and at the end
(``convergence.py``): the game's guarantee is for the averaged iterates.

``Z_g = E_{x~q}[pi_g(x) / q(x)]`` is estimated on a minibatch of the
``proposal`` pool: sequences drawn from ``q = (1/K) sum_k pi_k`` itself (an
expert picked uniformly, then its own sample), scored once by the experts, so
each step costs one gate forward on them. Without a pool the union of the
per-domain minibatches stands in for q; that is biased whenever the experts
are far from their domains' data (real text), since a gate that routes real
text correctly has ``E_data[pi_g/q]`` near K times its weight on the right
expert, not 1, and the constraint then fights the objective.

The loop is agnostic of the model: ``sequence_logprob_fn(model, batch)`` gives
``log pi_model(x)``, so the same loop fits the sequence gate and, as the
ablation, the causal router directly (``normalized=True``: a per-token mixture
is a distribution by construction, so there is no mu). The data it plays on
is ``game_data.py``'s, and its checkpoints follow ``checkpoint.py``.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from gatemix.gate.fit.checkpoint import (
    CHECKPOINT_FILE,
    comparable_config,
    load_checkpoint,
    save_checkpoint,
)
from gatemix.gate.fit.config import PrimalDualConfig
from gatemix.gate.fit.convergence import (
    DualityGap,
    ParameterAverage,
    averaging_start,
    lambda_side_gap,
    schedule_factor,
)
from gatemix.gate.fit.game_data import (
    GateFitData,
    SequenceLogprobFn,
    gated_sequence_logprobs,
    per_sequence_loss,
)
from gatemix.gate.fit.losses import (
    domain_means,
    dual_ascent_step,
    eg_lambda_step,
    ema_update,
    estimate_normalizer,
)

logger = logging.getLogger(__name__)

EVALUATION_CHUNK = 128  # sequences per forward pass of a duality-gap check


@dataclass
class PrimalDualResult:
    lambda_avg: list[float]  # averaged iterates after the burn-in
    mu_avg: float
    z_avg: float
    domain_losses_avg: list[float]
    final_lambda: list[float]
    final_mu: float
    final_z: float
    history: dict[str, list] = field(default_factory=dict)
    resumed_from: int = 0
    gap: DualityGap | None = None  # the final check of the averaged iterates


@dataclass
class _Game:
    """Everything the loop carries from one step to the next (and checkpoints)."""

    domain_lambda: torch.Tensor
    mu: float = 0.0
    z_ema: float = 1.0
    step: int = 0
    history: dict[str, list] = field(default_factory=lambda: {
        "lambda": [], "mu": [], "z_ema": [], "z_batch": [], "losses": [], "step_factor": [],
        "gap_step": [], "gap": [],
    })
    average: ParameterAverage = field(default_factory=ParameterAverage)


class _Loop:
    """One primal-dual fit: the model, its data, the optimizer and the game state."""

    def __init__(self, model, data, config, fn, normalized, parameter_groups, initial_mu) -> None:
        self.model, self.data, self.config = model, data, config
        self.fn, self.normalized = fn, normalized
        groups = parameter_groups if parameter_groups is not None else model.parameters()
        self.optimizer = torch.optim.AdamW(
            groups, lr=config.learning_rate, weight_decay=config.weight_decay
        )
        self.base_lrs = [group["lr"] for group in self.optimizer.param_groups]
        self.generator = torch.Generator().manual_seed(config.seed)
        if config.fixed_lambda is not None:
            start = torch.tensor(config.fixed_lambda, dtype=torch.float64)
        else:
            start = torch.full((data.num_domains,), 1.0 / data.num_domains, dtype=torch.float64)
        self.game = _Game(domain_lambda=start, mu=initial_mu)
        self.lower = None if config.lambda_lower is None else torch.tensor(config.lambda_lower)
        self.upper = None if config.lambda_upper is None else torch.tensor(config.lambda_upper)
        self.per_domain = data.domain_indices()
        # The gap is measured on fixed rows, drawn from their own generator so the
        # minibatch stream is the same with and without the check.
        gap_generator = torch.Generator().manual_seed(config.seed + 1)
        self.gap_rows = torch.cat([
            idx[torch.randperm(len(idx), generator=gap_generator)[: config.gap_batch_per_domain]]
            for idx in self.per_domain
        ])
        self.z_rows = None
        if data.proposal is not None:
            count = len(data.proposal["expert_sequence_logprobs"])
            self.z_rows = torch.randperm(count, generator=gap_generator)[
                : config.gap_batch_per_domain * data.num_domains
            ]

    def z_batch(self) -> dict[str, torch.Tensor] | None:
        """A minibatch of the q pool for ``Z_hat`` (None: the data batch stands in for q)."""
        if self.data.proposal is None:
            return None
        rows = torch.randint(
            len(self.data.proposal["expert_sequence_logprobs"]),
            (self.config.batch_per_domain * self.data.num_domains,),
            generator=self.generator,
        )
        return {name: tensor[rows] for name, tensor in self.data.proposal.items()}

    def step(self) -> dict:
        """One step of theta, lambda and mu; returns the step's record."""
        config, game = self.config, self.game
        factor = schedule_factor(game.step, config)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor
        indices = torch.cat([
            idx[torch.randint(len(idx), (config.batch_per_domain,), generator=self.generator)]
            for idx in self.per_domain
        ])
        batch = self.data.select(indices)
        model_logprobs = self.fn(self.model, batch)  # (B,)
        losses = domain_means(
            per_sequence_loss(config.loss, model_logprobs, batch), batch["domain"],
            self.data.num_domains,
        )  # (D,)
        lagrangian = (game.domain_lambda.to(losses.dtype) * losses).sum()
        z_batch = 1.0
        if not self.normalized:
            z_data = self.z_batch()
            z_logprobs = model_logprobs if z_data is None else self.fn(self.model, z_data)
            z_data = batch if z_data is None else z_data
            z_hat = estimate_normalizer(z_logprobs, z_data["expert_sequence_logprobs"])
            multiplier = game.mu + config.mu_proportional * (game.z_ema - 1)  # PI: integral + proportional
            lagrangian = lagrangian + multiplier * (z_hat - 1)
            z_batch = z_hat.item()
        self.optimizer.zero_grad(set_to_none=True)
        lagrangian.backward()
        self.optimizer.step()
        if config.fixed_lambda is None and game.step >= config.lambda_warmup * config.steps:
            game.domain_lambda = eg_lambda_step(
                game.domain_lambda, losses.detach(), factor * config.lambda_step,
                config.lambda_smoothing, self.lower, self.upper,
            )
        if not self.normalized:
            game.z_ema = ema_update(game.z_ema, z_batch, config.z_ema_decay)
            game.mu = dual_ascent_step(
                game.mu, game.z_ema - 1, factor * config.mu_step, config.mu_nonnegative
            )
        if game.step >= averaging_start(config):
            game.average.update(self.model)
        return {
            "lambda": game.domain_lambda.tolist(), "mu": game.mu, "z_ema": game.z_ema,
            "z_batch": z_batch, "losses": losses.detach().tolist(), "step_factor": factor,
        }

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> tuple[torch.Tensor, float]:
        """``(D,)`` per-domain losses on the gap rows and ``Z`` on the fixed q rows (1 if normalized).

        In chunks of ``EVALUATION_CHUNK`` sequences, so a gap batch of every fit
        sequence never copies the experts' hidden states whole.
        """
        model.eval()
        losses, z_logprobs, z_experts = [], [], []
        for rows in self.gap_rows.split(EVALUATION_CHUNK):
            batch = self.data.select(rows)
            model_logprobs = self.fn(model, batch)
            losses.append(per_sequence_loss(self.config.loss, model_logprobs, batch))
            if not self.normalized and self.z_rows is None:
                z_logprobs.append(model_logprobs)
                z_experts.append(batch["expert_sequence_logprobs"])
        domain_losses = domain_means(
            torch.cat(losses), self.data.tensors["domain"][self.gap_rows], self.data.num_domains
        )
        z_value = 1.0
        if not self.normalized:
            for rows in () if self.z_rows is None else self.z_rows.split(EVALUATION_CHUNK):
                z_data = {name: tensor[rows] for name, tensor in self.data.proposal.items()}
                z_logprobs.append(self.fn(model, z_data))
                z_experts.append(z_data["expert_sequence_logprobs"])
            z_value = float(estimate_normalizer(torch.cat(z_logprobs), torch.cat(z_experts)))
        model.train()
        return domain_losses.double(), z_value

    def averaged_model(self) -> nn.Module:
        return self.game.average.copy_into(copy.deepcopy(self.model))

    def lambda_average(self) -> torch.Tensor:
        rows = self.game.history["lambda"][averaging_start(self.config):] or self.game.history["lambda"]
        return torch.tensor(rows, dtype=torch.float64).mean(0)

    def check_gap(self) -> None:
        """The lambda side of the gap of the averaged iterates, recorded in the history."""
        if not self.game.average.count:
            return
        losses, _ = self.evaluate(self.averaged_model())
        self.game.history["gap_step"].append(self.game.step)
        self.game.history["gap"].append(lambda_side_gap(losses, self.lambda_average()))

    def checkpoint(self, path: Path) -> None:
        game = self.game
        path.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(path, {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(), "lambda": game.domain_lambda, "mu": game.mu,
            "z_ema": game.z_ema, "history": game.history, "step": game.step,
            "average": game.average.state(), "config": comparable_config(self.config),
            "fingerprint": self.data.fingerprint,
        })

    def resume(self, path: Path) -> None:
        saved = load_checkpoint(path, self.config, self.data.fingerprint)
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.generator.set_state(saved["generator"])
        self.game = _Game(
            domain_lambda=saved["lambda"], mu=saved["mu"], z_ema=saved["z_ema"],
            step=saved["step"], history=saved["history"],
            average=ParameterAverage.from_state(saved["average"]),
        )
        logger.info("resuming the primal-dual fit from step %s", self.game.step)


def run_primal_dual(
    model: nn.Module,
    data: GateFitData,
    config: PrimalDualConfig,
    *,
    sequence_logprob_fn: SequenceLogprobFn = gated_sequence_logprobs,
    normalized: bool = False,
    work_dir: str | Path | None = None,
    on_step: Callable[[int, dict], None] | None = None,
    progress: bool = False,
    parameter_groups: list[dict] | None = None,
    initial_mu: float = 0.0,
    progress_label: str = "primal-dual",
) -> PrimalDualResult:
    """Fit ``model`` in place by the stochastic primal-dual loop and return the iterates.

    With ``work_dir`` a checkpoint is written every ``config.checkpoint_every``
    steps and a later call with the same data and config resumes from it; the
    resumed fit is step-for-step the uninterrupted one (all randomness comes
    from one generator whose state is checkpointed). ``on_step(step, record)``
    is called after each step (for tests and logging). ``parameter_groups``
    (AdamW groups, each may set its own ``lr`` and ``weight_decay``) default to
    all of the model's parameters. With ``config.average_parameters`` the model
    ends holding the average of its iterates after the burn-in, the point the
    final duality-gap check is made at.
    """
    torch.set_num_threads(config.torch_threads)
    loop = _Loop(model, data, config, sequence_logprob_fn, normalized, parameter_groups, initial_mu)
    checkpoint_path = Path(work_dir) / CHECKPOINT_FILE if work_dir is not None else None
    if checkpoint_path is not None and checkpoint_path.is_file():
        loop.resume(checkpoint_path)
    start = loop.game.step
    steps = range(start, config.steps)
    if progress:
        steps = tqdm(steps, desc=progress_label, initial=start, total=config.steps)
    model.train()
    for step in steps:
        record = loop.step()
        for name, value in record.items():
            loop.game.history[name].append(value)
        loop.game.step = done = step + 1
        if config.gap_every and done % config.gap_every == 0:
            loop.check_gap()
        if on_step is not None:
            on_step(step, record)
        if (checkpoint_path is not None and config.checkpoint_every
                and (done % config.checkpoint_every == 0 or done == config.steps)):
            loop.checkpoint(checkpoint_path)
    if config.average_parameters:
        loop.game.average.copy_into(model)
    model.eval()
    result = _summarize(loop.game.history, config, resumed_from=start)
    result.gap = final_gap(loop, model, result)
    return result


def final_gap(loop: _Loop, model: nn.Module, result: PrimalDualResult) -> DualityGap:
    """The duality gap of the returned model and ``lambda_avg``: lambda side, then theta side.

    The theta side fits a copy of the model against the frozen ``lambda_avg`` for
    ``best_response_fraction`` of the steps, from the model itself, and compares
    ``L(lambda_avg, .)`` before and after. For a gate with the constraint
    ``Z_g = 1`` the best response keeps mu's dual ascent (from ``mu_avg``): with
    mu frozen it would buy ``mu (Z - 1)`` by driving Z off 1, which says nothing
    about the game. Both models' Z are reported beside the gap.
    """
    config = loop.config
    lambda_avg = torch.tensor(result.lambda_avg, dtype=torch.float64)
    losses, z_model = loop.evaluate(model)
    gap = DualityGap(
        lambda_side=lambda_side_gap(losses, lambda_avg), theta_side=None,
        domain_losses=losses.tolist(), z_avg_model=z_model,
    )
    steps = int(config.best_response_fraction * config.steps)
    if steps < 1 or config.fixed_lambda is not None:
        return gap
    response_config = dataclasses.replace(
        config, steps=steps, fixed_lambda=tuple(result.lambda_avg), checkpoint_every=0,
        gap_every=0, best_response_fraction=0.0, seed=config.seed + 2,
    )
    responder = copy.deepcopy(model)
    groups = None
    if len(loop.optimizer.param_groups) > 1:
        # The same per-group settings on the copy's parameters (matched by position).
        own = dict(zip((id(p) for p in model.parameters()), responder.parameters()))
        groups = [{**{k: v for k, v in g.items() if k != "params"},
                   "params": [own[id(p)] for p in g["params"]]}
                  for g in _groups_at_base_lr(loop)]
    run_primal_dual(
        responder, loop.data, response_config, sequence_logprob_fn=loop.fn,
        normalized=loop.normalized, parameter_groups=groups,
        initial_mu=0.0 if loop.normalized else result.mu_avg,
    )
    response_losses, z_response = loop.evaluate(responder)
    gap.theta_side = float((lambda_avg * losses).sum() - (lambda_avg * response_losses).sum())
    gap.best_response_losses = response_losses.tolist()
    gap.z_best_response = z_response
    gap.best_response_steps = steps
    if gap.theta_side < 0:
        gap.notes.append("the best response did not improve on the averaged model (SGD noise)")
    if not loop.normalized and abs(z_model - 1) > 0.05:
        gap.notes.append(f"the averaged gate's Z is {z_model:.3f}, not 1: its losses are not a "
                         "normalized model's")
    return gap


def _groups_at_base_lr(loop: _Loop) -> list[dict]:
    return [{**group, "lr": base} for group, base in zip(loop.optimizer.param_groups, loop.base_lrs)]


def _summarize(
    history: dict[str, list], config: PrimalDualConfig, resumed_from: int
) -> PrimalDualResult:
    first = min(int(config.average_from * len(history["mu"])), len(history["mu"]) - 1)

    def mean_rows(rows: list) -> list[float]:
        return torch.tensor(rows[first:], dtype=torch.float64).mean(0).tolist()

    return PrimalDualResult(
        lambda_avg=mean_rows(history["lambda"]),
        mu_avg=float(mean_rows([[m] for m in history["mu"]])[0]),
        z_avg=float(mean_rows([[z] for z in history["z_ema"]])[0]),
        domain_losses_avg=mean_rows(history["losses"]),
        final_lambda=history["lambda"][-1],
        final_mu=history["mu"][-1],
        final_z=history["z_ema"][-1],
        history=history,
        resumed_from=resumed_from,
    )
