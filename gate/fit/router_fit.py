"""The router stage: the sequence-level robust gate -> the causal router the engine runs.

The sequence gate ``pi_g`` reads the whole sequence, so the engine cannot run
it token by token. The router ``gamma_phi`` is fitted to it instead
("structural" fit): on sequences drawn from ``pi_g`` (``robust_sampling``), on
the domains' real text weighted by the game's lambda, or both, with the
experts' per-token log-probs and final hidden states cached, ``gamma_phi``
minimizes the per-token mixture loss
``-log sum_k gamma_phi(h_<=t)_k pi_k(x_{t+1} | x_<=t)``. The experts stay frozen.
"""

from __future__ import annotations

import torch
from torch import nn

from gatemix.gate.fit.config import ROUTER_SOURCES, RouterFitConfig
from gatemix.gate.fit.expert_bank import ExpertBank
from gatemix.gate.fit.robust_sampling import sample_robust_model
from gatemix.gate.mixing import mix_logprobs
from gatemix.gate.router import HiddenStateRouter, RouterForm, router_log_weights
from gatemix.gate.token_features import TokenFeatures


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


def weighted_nll(
    router: HiddenStateRouter, features: TokenFeatures, weights: torch.Tensor, rows: torch.Tensor
) -> torch.Tensor:
    """The mixture NLL of ``rows``, each sequence's tokens weighted by ``weights`` (N,). Nats/token."""
    mask = features.token_mask[rows] * weights[rows, None]
    token_logprobs = routed_token_logprobs(
        router,
        features.hidden[rows],
        features.next_logprobs[rows],
        features.input_ids[rows],
        features.attention_mask[rows],
    )
    return -(token_logprobs * mask).sum() / mask.sum().clamp_min(1e-12)


def holdout_split(
    num_sequences: int, holdout_fraction: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded (held-out rows, training rows); nothing held out of a single sequence."""
    order = torch.randperm(num_sequences, generator=generator)
    num_held = int(num_sequences * holdout_fraction) if num_sequences > 1 else 0
    return order[:num_held], order[num_held:]


class BestHeldOut:
    """The parameters at the step with the lowest held-out loss, and that step's figures."""

    def __init__(self) -> None:
        self.figures = {"step": 0, "held_out_nll": float("inf")}
        self.state: dict | None = None

    def offer(self, router: nn.Module, step: int, held_out_nll: float) -> None:
        if held_out_nll < self.figures["held_out_nll"]:
            self.figures = {"step": step, "held_out_nll": held_out_nll}
            self.state = {k: v.detach().clone() for k, v in router.state_dict().items()}

    def restore(self, router: nn.Module) -> None:
        if self.state is not None:
            router.load_state_dict(self.state)


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
    weights = torch.ones(num_sequences) if token_weights is None else token_weights.float()
    held, train = holdout_split(num_sequences, holdout_fraction, generator)
    optimizer = torch.optim.AdamW(router.parameters(), lr=learning_rate, weight_decay=0.0)
    evaluate_every = max(1, steps // 20)
    best, losses = BestHeldOut(), []
    for step in range(1, steps + 1):
        router.train()
        picked = train[torch.randint(len(train), (min(batch_size, len(train)),), generator=generator)]
        loss = weighted_nll(router, features, weights, picked)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if len(held) and (step % evaluate_every == 0 or step == steps):
            router.eval()
            with torch.no_grad():
                best.offer(router, step, float(weighted_nll(router, features, weights, held)))
    best.restore(router)
    router.eval()
    return losses, best.figures if len(held) else {}


def lambda_weighted_data(
    domain_features: list[TokenFeatures], lambdas: list[float] | tuple[float, ...]
) -> tuple[TokenFeatures, torch.Tensor]:
    """Real sequences of every domain, each token weighted so domain j carries ``lambda_j``.

    At the game's saddle point the robust model approximates the
    ``lambda*``-mixture of the domains, so the real text of that mixture is an
    on-distribution sample of the router's target; the experts' own samples
    are far from real text when the experts are small.
    """
    if len(domain_features) != len(lambdas):
        raise ValueError(f"{len(domain_features)} domains but {len(lambdas)} lambdas")
    weights = []
    for part, share in zip(domain_features, lambdas):
        tokens = float(part.token_mask.sum().clamp_min(1))
        weights.append(torch.full((part.input_ids.shape[0],), float(share) / tokens))
    return TokenFeatures.concat(list(domain_features)), torch.cat(weights)


def router_training_set(
    bank: ExpertBank,
    gate: nn.Module,
    config: RouterFitConfig,
    domain_features: list[TokenFeatures] | None,
    lambdas: list[float] | tuple[float, ...] | None,
    proposals: TokenFeatures | None,
) -> tuple[TokenFeatures, torch.Tensor, dict]:
    """The router's sequences (samples of ``pi_g``, lambda-weighted data, or both), weights, stats."""
    if config.source not in ROUTER_SOURCES:
        raise ValueError(f"router source must be one of {ROUTER_SOURCES}, got {config.source!r}")
    parts, part_weights, stats = [], [], {"source": config.source}
    if config.source in ("samples", "both"):
        samples, sampling = sample_robust_model(
            bank, gate, config.num_samples, config.length, method=config.sampler,
            oversample=config.oversample, seed=config.seed, proposals=proposals,
        )
        tokens = float(samples.token_mask.sum().clamp_min(1))
        parts.append(samples)
        part_weights.append(torch.full((samples.input_ids.shape[0],), 1.0 / tokens))
        stats.update(sampling=sampling, samples=samples.input_ids.shape[0])
    if config.source in ("data", "both"):
        if domain_features is None or lambdas is None:
            raise ValueError(f"source {config.source!r} needs the domains' features and the lambdas")
        data, data_weights = lambda_weighted_data(domain_features, lambdas)
        parts.append(data)
        part_weights.append(data_weights)
        stats["data_sequences"] = data.input_ids.shape[0]
    return TokenFeatures.concat(parts), torch.cat(part_weights), stats


def fit_router(
    bank: ExpertBank,
    gate: nn.Module,
    config: RouterFitConfig,
    *,
    domain_features: list[TokenFeatures] | None = None,
    lambdas: list[float] | tuple[float, ...] | None = None,
    proposals: TokenFeatures | None = None,
) -> tuple[HiddenStateRouter, dict]:
    """Fit a ``HiddenStateRouter`` to the robust gated model ``gate``.

    ``config.source`` says what the router is trained on: ``samples`` drawn from
    the robust model (the paper's route, SIR over ``proposals`` when given), the
    real ``domain_features`` weighted by the game's ``lambdas``, or ``both`` with
    equal total weight. The router starts at the uniform gate. Returns the
    router and the statistics for the artifact.
    """
    features, token_weights, stats = router_training_set(
        bank, gate, config, domain_features, lambdas, proposals
    )
    torch.manual_seed(config.seed)
    router = HiddenStateRouter(
        RouterForm.for_experts(
            bank.hidden_sizes, router_hidden=config.router_hidden,
            context_config=config.context_config,
        )
    )
    router.set_constant(torch.ones(bank.num_experts))  # start at uniform, then learn
    losses, held_out = train_router(
        router, features, steps=config.steps, batch_size=config.batch_size,
        learning_rate=config.learning_rate, seed=config.seed, token_weights=token_weights,
        holdout_fraction=config.holdout_fraction,
    )
    tail = losses[-max(1, len(losses) // 10) :]
    stats.update(final_train_nll=sum(tail) / len(tail), **held_out)
    return router, stats
