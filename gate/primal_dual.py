"""The stochastic primal-dual loop of the robust gate, with checkpoints that resume.

Each step samples ``batch_per_domain`` sequences from every domain, computes
the model's sequence log-probs on them, and then

- theta: one AdamW step on ``sum_j lambda_j L_j(theta) + mu (Z_hat - 1)``;
- lambda: one exponentiated-gradient step on the per-domain losses;
- mu: one dual-ascent step on ``Z_ema - 1``.

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
is a distribution by construction, so there is no mu).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from gatemix.errors import UserError
from gatemix.gate.config import PrimalDualConfig
from gatemix.gate.losses import (
    cross_entropy_loss,
    domain_means,
    dual_ascent_step,
    eg_lambda_step,
    ema_update,
    estimate_normalizer,
    excess_loss,
)
from gatemix.gate.mixing import mix_sequence_logprobs

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "primal_dual.pt"
# Fields that may change between an interrupted fit and its resumption.
RESUMABLE_FIELDS = ("steps", "checkpoint_every", "torch_threads")

SequenceLogprobFn = Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]


class ResumeError(UserError):
    """A checkpoint that belongs to another fit (other data or other hyperparameters)."""


@dataclass
class GateFitData:
    """Per-sequence tensors, all indexed by sequence along dim 0.

    Always present: ``domain`` (N,) long, ``num_tokens`` (N,) float (scored
    tokens), ``expert_sequence_logprobs`` (N, K) float. Model inputs come next
    to them (``input_ids``/``attention_mask`` for the sequence gate,
    ``hidden``/``next_logprobs``/``token_mask`` for the causal router).
    """

    tensors: dict[str, torch.Tensor]
    num_domains: int
    fingerprint: str = ""  # identifies the data in checkpoints
    # Samples from q for the Z estimate: the model's inputs and ``expert_sequence_logprobs``.
    proposal: dict[str, torch.Tensor] | None = None

    def __post_init__(self) -> None:
        sizes = {name: tensor.shape[0] for name, tensor in self.tensors.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"fit tensors disagree on the number of sequences: {sizes}")
        if self.proposal is not None:
            proposal_sizes = {name: tensor.shape[0] for name, tensor in self.proposal.items()}
            if len(set(proposal_sizes.values())) != 1 or "expert_sequence_logprobs" not in self.proposal:
                raise ValueError(f"proposal tensors are inconsistent: {proposal_sizes}")
        counts = torch.bincount(self.tensors["domain"], minlength=self.num_domains)
        if len(counts) != self.num_domains or (counts == 0).any():
            raise ValueError(f"every domain needs sequences, got counts {counts.tolist()}")

    def select(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: tensor[indices] for name, tensor in self.tensors.items()}

    def domain_indices(self) -> list[torch.Tensor]:
        domain = self.tensors["domain"]
        return [torch.nonzero(domain == j).squeeze(1) for j in range(self.num_domains)]


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


def gated_sequence_logprobs(gate: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``log pi_g(x) = logsumexp_k(log g(x,k) + log pi_k(x))`` for the sequence gate. -> (B,)."""
    log_gate = gate(batch["input_ids"], batch["attention_mask"])  # (B, K)
    return mix_sequence_logprobs(batch["expert_sequence_logprobs"], log_gate)


def reference_logprobs(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The in-domain expert's log-prob of each sequence (expert j is domain j's). -> (B,)."""
    return batch["expert_sequence_logprobs"].gather(1, batch["domain"].unsqueeze(1)).squeeze(1)


def _per_sequence_loss(kind: str, model_logprobs: torch.Tensor, batch: dict) -> torch.Tensor:
    if kind == "excess":
        return excess_loss(model_logprobs, reference_logprobs(batch), batch["num_tokens"])
    return cross_entropy_loss(model_logprobs, batch["num_tokens"])


def _comparable(config: PrimalDualConfig) -> dict:
    return {k: v for k, v in config.to_dict().items() if k not in RESUMABLE_FIELDS}


def _save_checkpoint(path: Path, payload: dict) -> None:
    # Write then rename, so an interruption mid-write leaves the last good checkpoint.
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


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
) -> PrimalDualResult:
    """Fit ``model`` in place by the stochastic primal-dual loop and return the iterates.

    With ``work_dir`` a checkpoint is written every ``config.checkpoint_every``
    steps and a later call with the same data and config resumes from it; the
    resumed fit is step-for-step the uninterrupted one (all randomness comes
    from one generator whose state is checkpointed). ``on_step(step, record)``
    is called after each step (for tests and logging).
    """
    torch.set_num_threads(config.torch_threads)
    num_domains = data.num_domains
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    generator = torch.Generator().manual_seed(config.seed)
    if config.fixed_lambda is not None:
        domain_lambda = torch.tensor(config.fixed_lambda, dtype=torch.float64)
    else:
        domain_lambda = torch.full((num_domains,), 1.0 / num_domains, dtype=torch.float64)
    lower = None if config.lambda_lower is None else torch.tensor(config.lambda_lower)
    upper = None if config.lambda_upper is None else torch.tensor(config.lambda_upper)
    mu, z_ema, start = 0.0, 1.0, 0
    history: dict[str, list] = {"lambda": [], "mu": [], "z_ema": [], "z_batch": [], "losses": []}

    checkpoint_path = Path(work_dir) / CHECKPOINT_FILE if work_dir is not None else None
    if checkpoint_path is not None and checkpoint_path.is_file():
        saved = torch.load(checkpoint_path, weights_only=False)
        if saved["config"] != _comparable(config) or saved["fingerprint"] != data.fingerprint:
            raise ResumeError(
                f"{checkpoint_path} is from a fit with other data or settings; "
                "delete it or use another work_dir"
            )
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        generator.set_state(saved["generator"])
        domain_lambda, mu, z_ema = saved["lambda"], saved["mu"], saved["z_ema"]
        history, start = saved["history"], saved["step"]
        logger.info("resuming the primal-dual fit from step %s", start)

    per_domain = data.domain_indices()
    steps = range(start, config.steps)
    if progress:
        from tqdm import tqdm

        steps = tqdm(steps, desc="primal-dual", initial=start, total=config.steps)
    model.train()
    for step in steps:
        indices = torch.cat(
            [
                idx[torch.randint(len(idx), (config.batch_per_domain,), generator=generator)]
                for idx in per_domain
            ]
        )
        batch = data.select(indices)
        model_logprobs = sequence_logprob_fn(model, batch)  # (B,)
        losses = domain_means(
            _per_sequence_loss(config.loss, model_logprobs, batch), batch["domain"], num_domains
        )  # (D,)
        lagrangian = (domain_lambda.to(losses.dtype) * losses).sum()
        z_batch = 1.0
        if not normalized:
            if data.proposal is None:
                z_batch_data = batch
                z_logprobs = model_logprobs
            else:
                rows = torch.randint(
                    len(data.proposal["expert_sequence_logprobs"]),
                    (config.batch_per_domain * num_domains,),
                    generator=generator,
                )
                z_batch_data = {name: tensor[rows] for name, tensor in data.proposal.items()}
                z_logprobs = sequence_logprob_fn(model, z_batch_data)
            z_hat = estimate_normalizer(z_logprobs, z_batch_data["expert_sequence_logprobs"])
            lagrangian = lagrangian + mu * (z_hat - 1)
            z_batch = z_hat.item()
        optimizer.zero_grad(set_to_none=True)
        lagrangian.backward()
        optimizer.step()

        if config.fixed_lambda is None:
            domain_lambda = eg_lambda_step(
                domain_lambda,
                losses.detach(),
                config.lambda_step,
                config.lambda_smoothing,
                lower,
                upper,
            )
        if not normalized:
            z_ema = ema_update(z_ema, z_batch, config.z_ema_decay)
            mu = dual_ascent_step(mu, z_ema - 1, config.mu_step, config.mu_nonnegative)
        record = {
            "lambda": domain_lambda.tolist(),
            "mu": mu,
            "z_ema": z_ema,
            "z_batch": z_batch,
            "losses": losses.detach().tolist(),
        }
        for name, value in record.items():
            history[name].append(value)
        if on_step is not None:
            on_step(step, record)
        done = step + 1
        if (
            checkpoint_path is not None
            and config.checkpoint_every
            and (done % config.checkpoint_every == 0 or done == config.steps)
        ):
            checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
            _save_checkpoint(
                checkpoint_path,
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "generator": generator.get_state(),
                    "lambda": domain_lambda,
                    "mu": mu,
                    "z_ema": z_ema,
                    "history": history,
                    "step": done,
                    "config": _comparable(config),
                    "fingerprint": data.fingerprint,
                },
            )
    model.eval()
    return _summarize(history, config, resumed_from=start)


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


def plot_history(history: dict[str, list], path: str | Path, domain_names: list[str]) -> Path:
    """Plot lambda, mu and Z_g over the iterations into one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    lambdas = torch.tensor(history["lambda"]).T
    for name, row in zip(domain_names, lambdas):
        axes[0].plot(row.numpy(), label=name)
    axes[0].set(title="lambda (domain weights)", xlabel="step", ylim=(0, 1))
    axes[0].legend()
    axes[1].plot(history["mu"])
    axes[1].set(title="mu (normalization multiplier)", xlabel="step")
    axes[2].plot(history["z_batch"], alpha=0.3, label="batch estimate")
    axes[2].plot(history["z_ema"], label="EMA")
    axes[2].axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    axes[2].set(title="Z_g (importance-sampling estimate)", xlabel="step")
    axes[2].legend()
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
