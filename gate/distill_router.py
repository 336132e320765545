"""Structural distillation: the sequence-level robust gate -> the causal router the engine runs.

``pi_g`` reads the whole sequence, so it cannot generate token by token. We
sample sequences from it exactly, using the proposal ``q = (1/K) sum_k pi_k``
(pick an expert uniformly, let it generate), and

- rejection: accept x with probability ``pi_g(x) / (K q(x))``, which is at most
  1 because ``pi_g <= K q`` for any gate on the simplex (acceptance about 1/K);
- SIR: draw ``oversample`` times more proposals and resample them in
  proportion to ``pi_g(x) / q(x)`` (no rejection loop, slightly biased for small pools).

On the kept samples, with the experts' per-token log-probs and final hidden
states cached, the router ``gamma_phi`` minimizes the per-token mixture loss
``-log sum_k gamma_phi(h_<=t)_k pi_k(x_{t+1} | x_<=t)``. The experts stay frozen.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from gatemix.gate.losses import importance_log_ratios
from gatemix.gate.mixing import mix_logprobs, mix_sequence_logprobs
from gatemix.gate.router import HiddenStateRouter, RouterForm

logger = logging.getLogger(__name__)


@dataclass
class TokenFeatures:
    """What the experts say about a batch of sequences, aligned on the predicted token.

    Position t holds the prediction of token t+1 from tokens <= t:
    ``next_logprobs`` (N, T-1, K) = log pi_k(x_{t+1} | x_<=t), ``hidden``
    (N, T-1, K*H) = the K experts' final hidden states at t, concatenated in
    expert order (the router's input in the engine), ``token_mask`` (N, T-1).
    """

    input_ids: torch.Tensor  # (N, T)
    attention_mask: torch.Tensor  # (N, T)
    next_logprobs: torch.Tensor
    hidden: torch.Tensor | None
    token_mask: torch.Tensor

    def sequence_logprobs(self) -> torch.Tensor:
        """``log pi_k(x)`` of the scored tokens. -> (N, K)."""
        return (self.next_logprobs * self.token_mask.unsqueeze(-1)).sum(1)

    def num_tokens(self) -> torch.Tensor:
        return self.token_mask.sum(1).float()

    def select(self, indices: torch.Tensor) -> TokenFeatures:
        return TokenFeatures(
            self.input_ids[indices],
            self.attention_mask[indices],
            self.next_logprobs[indices],
            None if self.hidden is None else self.hidden[indices],
            self.token_mask[indices],
        )

    @staticmethod
    def concat(parts: list[TokenFeatures]) -> TokenFeatures:
        width = max(part.input_ids.shape[1] for part in parts)

        def pad(tensor: torch.Tensor, length: int) -> torch.Tensor:
            extra = length - tensor.shape[1]
            if extra == 0:
                return tensor
            shape = (tensor.shape[0], extra, *tensor.shape[2:])
            return torch.cat([tensor, tensor.new_zeros(shape)], dim=1)

        return TokenFeatures(
            torch.cat([pad(p.input_ids, width) for p in parts]),
            torch.cat([pad(p.attention_mask, width) for p in parts]),
            torch.cat([pad(p.next_logprobs, width - 1) for p in parts]),
            None
            if parts[0].hidden is None
            else torch.cat([pad(p.hidden, width - 1) for p in parts]),
            torch.cat([pad(p.token_mask, width - 1) for p in parts]),
        )


class ExpertBank(Protocol):
    """The frozen experts, as the fit and the distillation need them."""

    num_experts: int
    hidden_sizes: list[int]  # each expert's final hidden size, in expert order

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TokenFeatures: ...

    def sample(
        self, expert: int, num: int, length: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


def router_log_weights(
    router: HiddenStateRouter,
    hidden: torch.Tensor,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    next_logprobs: torch.Tensor | None = None,
) -> torch.Tensor:
    """The router's weights for predicting token t+1, for every scored position t.

    ``hidden`` ``(N, T-1, K*H)`` is aligned on the predicting position, and
    ``input_ids`` ``(N, T)`` are the whole sequences, whose first T-1 tokens are
    what a context model reads; ``next_logprobs`` ``(N, T-1, K)``, aligned like
    ``hidden``, feed a posterior router's state. -> ``(N, T-1, K)``.
    """
    if input_ids is not None:
        width = hidden.shape[1]
        input_ids = input_ids[:, :width]
        attention_mask = None if attention_mask is None else attention_mask[:, :width]
    return router(hidden.float(), input_ids, attention_mask, next_logprobs)


def routed_token_logprobs(
    router: HiddenStateRouter,
    hidden: torch.Tensor,
    next_logprobs: torch.Tensor,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``log sum_k gamma(x_<=t)_k pi_k(x_{t+1}|x_<=t)``. ``(N, T, K*H)``, ``(N, T, K)`` -> ``(N, T)``."""
    log_weights = router_log_weights(router, hidden, input_ids, attention_mask, next_logprobs)  # (N, T, K)
    return mix_logprobs(next_logprobs.unsqueeze(-1), log_weights).squeeze(-1)


def routed_sequence_logprobs(router: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sequence log-prob of the per-token mixture (the primal-dual ablation's model). -> (B,)."""
    token_logprobs = routed_token_logprobs(
        router,
        batch["hidden"],
        batch["next_logprobs"],
        batch.get("input_ids"),
        batch.get("attention_mask"),
    )
    return (token_logprobs * batch["token_mask"]).sum(1)


@torch.no_grad()
def draw_from_q(
    bank: ExpertBank, count: int, length: int, generator: torch.Generator, batch_size: int
) -> TokenFeatures:
    """``count`` draws from q: an expert chosen uniformly, then its own sample."""
    choices = torch.randint(bank.num_experts, (count,), generator=generator)
    parts = []
    for expert in range(bank.num_experts):
        remaining = int((choices == expert).sum())
        while remaining > 0:
            num = min(batch_size, remaining)
            input_ids, attention_mask = bank.sample(expert, num, length, generator)
            parts.append(bank.score(input_ids, attention_mask))
            remaining -= num
    return TokenFeatures.concat(parts)


@torch.no_grad()
def gate_log_ratios(gate: nn.Module, features: TokenFeatures) -> torch.Tensor:
    """``log pi_g(x)/q(x)`` of scored sequences under the sequence gate. -> (N,)."""
    expert_logprobs = features.sequence_logprobs()
    log_gate = gate(features.input_ids, features.attention_mask)
    return importance_log_ratios(mix_sequence_logprobs(expert_logprobs, log_gate), expert_logprobs)


@torch.no_grad()
def sample_robust_model(
    bank: ExpertBank,
    gate: nn.Module,
    num_samples: int,
    length: int,
    *,
    method: str = "rejection",
    oversample: int = 4,
    seed: int = 0,
    batch_size: int = 64,
    max_rounds: int = 50,
    proposals: TokenFeatures | None = None,
) -> tuple[TokenFeatures, dict]:
    """Exact (rejection) or SIR samples from ``pi_g``, with their expert features.

    SIR resamples ``proposals`` (draws from q already scored, such as the pool
    the primal-dual loop used for Z) when given, else draws its own.
    """
    generator = torch.Generator().manual_seed(seed)
    gate.eval()
    if method == "sir":
        if proposals is None:
            proposals = draw_from_q(bank, num_samples * oversample, length, generator, batch_size)
        log_ratios = gate_log_ratios(gate, proposals)
        probs = torch.softmax(log_ratios.double(), 0)
        picked = torch.multinomial(probs, num_samples, replacement=True, generator=generator)
        ess = float(1.0 / (probs**2).sum())
        return proposals.select(picked), {"method": "sir", "proposals": len(probs), "ess": ess}
    if method != "rejection":
        raise ValueError(f"unknown sampler {method!r}")
    kept, proposed = [], 0
    for _ in range(max_rounds):
        proposals = draw_from_q(bank, num_samples, length, generator, batch_size)
        accept_log_prob = gate_log_ratios(gate, proposals) - math.log(bank.num_experts)
        uniform = torch.rand(accept_log_prob.shape, generator=generator, dtype=torch.float64)
        accepted = torch.nonzero(uniform.log() < accept_log_prob.double()).squeeze(1)
        kept.append(proposals.select(accepted))
        proposed += num_samples
        if sum(part.input_ids.shape[0] for part in kept) >= num_samples:
            break
    samples = TokenFeatures.concat(kept)
    accepted_count = samples.input_ids.shape[0]
    if accepted_count < num_samples:
        logger.warning("rejection sampling kept %s of %s samples", accepted_count, num_samples)
    samples = samples.select(torch.arange(min(num_samples, accepted_count)))
    return samples, {
        "method": "rejection",
        "proposals": proposed,
        "acceptance": accepted_count / proposed,
    }


def train_router(
    router: HiddenStateRouter,
    features: TokenFeatures,
    *,
    steps: int,
    batch_size: int = 32,
    learning_rate: float = 3e-3,
    seed: int = 0,
    token_weights: torch.Tensor | None = None,
    holdout_fraction: float = 0.0,
) -> tuple[list[float], dict]:
    """Minimize the weighted per-token mixture NLL ``-log gamma(h_t) . P_t`` over ``features``.

    ``token_weights`` (N,) weights every token of sequence i (None: all 1), so
    a domain can carry its robust share lambda_j of the loss whatever its size.
    With ``holdout_fraction`` > 0 that share of the sequences is held out and
    the router keeps the parameters with the best held-out loss: small routers
    on few sampled sequences overfit, and the held-out loss says when.

    Returns the training loss (nats/token) per step and the held-out figures.
    """
    if features.hidden is None:
        raise ValueError("router training needs the experts' hidden states")
    generator = torch.Generator().manual_seed(seed)
    num_sequences = features.input_ids.shape[0]
    weights = (
        torch.ones(num_sequences) if token_weights is None else token_weights.float()
    )
    order = torch.randperm(num_sequences, generator=generator)
    num_held = int(num_sequences * holdout_fraction) if num_sequences > 1 else 0
    held, train = order[:num_held], order[num_held:]

    def weighted_nll(rows: torch.Tensor) -> torch.Tensor:
        mask = features.token_mask[rows] * weights[rows, None]
        token_logprobs = routed_token_logprobs(
            router,
            features.hidden[rows],
            features.next_logprobs[rows],
            features.input_ids[rows],
            features.attention_mask[rows],
        )
        return -(token_logprobs * mask).sum() / mask.sum().clamp_min(1e-12)

    optimizer = torch.optim.AdamW(router.parameters(), lr=learning_rate, weight_decay=0.0)
    evaluate_every = max(1, steps // 20)
    best = {"step": 0, "held_out_nll": float("inf")}
    best_state = None
    losses = []
    for step in range(1, steps + 1):
        router.train()
        picked = train[torch.randint(len(train), (min(batch_size, len(train)),), generator=generator)]
        loss = weighted_nll(picked)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if num_held and (step % evaluate_every == 0 or step == steps):
            router.eval()
            with torch.no_grad():
                held_out = float(weighted_nll(held))
            if held_out < best["held_out_nll"]:
                best = {"step": step, "held_out_nll": held_out}
                best_state = {k: v.detach().clone() for k, v in router.state_dict().items()}
    if best_state is not None:
        router.load_state_dict(best_state)
    router.eval()
    return losses, best if num_held else {}


def lambda_weighted_data(
    domain_features: list[TokenFeatures], lambdas: list[float] | tuple[float, ...]
) -> tuple[TokenFeatures, torch.Tensor]:
    """Real sequences of every domain, each token weighted so domain j carries ``lambda_j``.

    At the game's saddle point the robust model approximates the
    ``lambda*``-mixture of the domains, so the real text of that mixture is an
    on-distribution sample of the distillation target; the experts' own samples
    are far from real text when the experts are small.
    """
    if len(domain_features) != len(lambdas):
        raise ValueError(f"{len(domain_features)} domains but {len(lambdas)} lambdas")
    weights = []
    for part, share in zip(domain_features, lambdas):
        tokens = float(part.token_mask.sum().clamp_min(1))
        weights.append(torch.full((part.input_ids.shape[0],), float(share) / tokens))
    return TokenFeatures.concat(list(domain_features)), torch.cat(weights)


DISTILL_SOURCES = ("samples", "data", "both")


def distill_router(
    bank: ExpertBank,
    gate: nn.Module,
    *,
    router_hidden: int = 0,
    num_samples: int = 256,
    length: int = 64,
    sampler: str = "sir",
    oversample: int = 4,
    steps: int = 400,
    batch_size: int = 16,
    learning_rate: float = 3e-3,
    seed: int = 0,
    source: str = "samples",
    domain_features: list[TokenFeatures] | None = None,
    lambdas: list[float] | tuple[float, ...] | None = None,
    holdout_fraction: float = 0.0,
    proposals: TokenFeatures | None = None,
    context_config: dict | None = None,
) -> tuple[HiddenStateRouter, dict]:
    """Fit a ``HiddenStateRouter`` to the robust gated model.

    ``source`` says what the router is trained on: ``samples`` drawn from the
    robust model (the paper's route), the real ``data`` of each domain weighted
    by the game's ``lambdas``, or ``both`` with equal total weight. The router
    starts at the uniform gate. Returns the router and the statistics for the artifact.
    """
    if source not in DISTILL_SOURCES:
        raise ValueError(f"distillation source must be one of {DISTILL_SOURCES}, got {source!r}")
    parts, part_weights, stats = [], [], {"source": source}
    if source in ("samples", "both"):
        samples, sampling = sample_robust_model(
            bank,
            gate,
            num_samples,
            length,
            method=sampler,
            oversample=oversample,
            seed=seed,
            proposals=proposals,
        )
        tokens = float(samples.token_mask.sum().clamp_min(1))
        parts.append(samples)
        part_weights.append(torch.full((samples.input_ids.shape[0],), 1.0 / tokens))
        stats.update(sampling=sampling, samples=samples.input_ids.shape[0])
    if source in ("data", "both"):
        if domain_features is None or lambdas is None:
            raise ValueError(f"source {source!r} needs the domains' features and the lambdas")
        data, data_weights = lambda_weighted_data(domain_features, lambdas)
        parts.append(data)
        part_weights.append(data_weights)
        stats["data_sequences"] = data.input_ids.shape[0]
    features = TokenFeatures.concat(parts)
    torch.manual_seed(seed)
    router = HiddenStateRouter(
        RouterForm.for_experts(
            bank.hidden_sizes, router_hidden=router_hidden, context_config=context_config
        )
    )
    router.set_constant(torch.ones(bank.num_experts))  # start at uniform, then learn
    losses, held_out = train_router(
        router,
        features,
        steps=steps,
        batch_size=batch_size,
        learning_rate=learning_rate,
        seed=seed,
        token_weights=torch.cat(part_weights),
        holdout_fraction=holdout_fraction,
    )
    tail = losses[-max(1, len(losses) // 10) :]
    stats.update(final_train_nll=sum(tail) / len(tail), **held_out)
    return router, stats
