"""The primal-dual math of the robust gate, as pure functions on tensors.

The game is ``min_theta max_lambda sum_j lambda_j L_j(theta) + mu (Z_g - 1)``:

- ``L_j`` is domain j's excess loss: the gated model's loss minus the in-domain
  expert's loss on that domain (the DoReMi form). It stands in for
  ``KL(P_j || pi_g)``, whose entropy term is unknown but cancels in the difference.
- ``lambda`` moves by exponentiated gradient, which keeps it on the simplex.
- ``mu`` moves by dual ascent on ``Z_g - 1``, where ``Z_g`` is estimated by
  importance sampling under ``q = (1/K) sum_k pi_k`` from cached sequence log-probs.

Everything is in log space with logsumexp: sequence log-probs of hundreds of
tokens are far below what ``exp`` can represent.
"""

from __future__ import annotations

import math

import torch


def excess_loss(
    model_logprobs: torch.Tensor, reference_logprobs: torch.Tensor, num_tokens: torch.Tensor
) -> torch.Tensor:
    """Per-sequence excess loss in nats per token: ``(log pi_ref(x) - log pi_model(x)) / n(x)``.

    Shapes: ``(B,)``, ``(B,)``, ``(B,)`` -> ``(B,)``. The reference is the
    in-domain expert of each sequence's domain; a mean over a domain of this
    value is that domain's KL proxy.
    """
    return (reference_logprobs - model_logprobs) / num_tokens.clamp_min(1)


def cross_entropy_loss(model_logprobs: torch.Tensor, num_tokens: torch.Tensor) -> torch.Tensor:
    """Per-sequence cross-entropy in nats per token. ``(B,)``, ``(B,)`` -> ``(B,)``."""
    return -model_logprobs / num_tokens.clamp_min(1)


def domain_means(values: torch.Tensor, domain_ids: torch.Tensor, num_domains: int) -> torch.Tensor:
    """Mean of ``values`` within each domain. ``(B,)``, ``(B,)`` int -> ``(D,)``.

    A domain absent from the batch gets NaN, so a caller that forgot one notices.
    """
    sums = torch.zeros(num_domains, dtype=values.dtype, device=values.device)
    sums = sums.index_add(0, domain_ids, values)
    counts = torch.bincount(domain_ids, minlength=num_domains).to(values.dtype)
    return sums / counts.where(counts > 0, torch.full_like(counts, float("nan")))


def project_to_prior_box(
    weights: torch.Tensor,
    lower: torch.Tensor | None = None,
    upper: torch.Tensor | None = None,
    iterations: int = 100,
) -> torch.Tensor:
    """KL (Bregman) projection of positive weights onto ``{lambda in simplex, lower <= lambda <= upper}``.

    ``(D,) -> (D,)``. The projection has the form ``clip(c * weights, lower, upper)``
    for the one scale ``c`` that makes it sum to 1; the sum is monotone in ``c``,
    so ``log c`` is found by bisection. This is the projection that matches the
    exponentiated-gradient geometry (a Euclidean one would not).
    """
    num_domains = weights.shape[-1]
    weights = weights.double()
    lower = torch.zeros(num_domains, dtype=torch.float64) if lower is None else lower.double()
    upper = torch.ones(num_domains, dtype=torch.float64) if upper is None else upper.double()
    if lower.sum() > 1 + 1e-9 or upper.sum() < 1 - 1e-9 or (lower > upper).any():
        raise ValueError(f"empty prior region: lower={lower.tolist()} upper={upper.tolist()}")
    log_weights = torch.log(weights.clamp_min(1e-300))

    def clipped(log_scale: float) -> torch.Tensor:
        return torch.minimum(torch.maximum((log_weights + log_scale).exp(), lower), upper)

    low, high = -800.0, 800.0
    for _ in range(iterations):
        middle = 0.5 * (low + high)
        if clipped(middle).sum() > 1:
            high = middle
        else:
            low = middle
    projected = clipped(0.5 * (low + high))
    return projected / projected.sum()


def eg_lambda_step(
    domain_lambda: torch.Tensor,
    domain_losses: torch.Tensor,
    step_size: float,
    smoothing: float = 0.0,
    lower: torch.Tensor | None = None,
    upper: torch.Tensor | None = None,
) -> torch.Tensor:
    """One exponentiated-gradient ascent step on lambda: the worst domain gains mass.

    ``(D,)``, ``(D,)`` -> ``(D,)`` on the simplex. ``smoothing`` in [0, 1] mixes
    the result with uniform (DoReMi's smoothing), which keeps every domain above
    ``smoothing / D``; ``lower``/``upper`` bound lambda to a prior region.
    """
    if not 0.0 <= smoothing <= 1.0:
        raise ValueError(f"smoothing must be in [0, 1], got {smoothing}")
    log_lambda = torch.log(domain_lambda.double().clamp_min(1e-300))
    log_lambda = log_lambda + step_size * domain_losses.detach().double()
    updated = torch.softmax(log_lambda, dim=-1)
    updated = (1 - smoothing) * updated + smoothing / updated.shape[-1]
    if lower is not None or upper is not None:
        updated = project_to_prior_box(updated, lower, upper)
    return updated.to(domain_lambda.dtype)


def dual_ascent_step(
    mu: float, constraint_value: float, step_size: float, nonnegative: bool = False
) -> float:
    """``mu + step_size * constraint_value``: mu rises while ``Z_g - 1 > 0``.

    The constraint ``Z_g = 1`` is an equality, so mu may go negative (a gate
    that under-spends its mass is pushed up); ``nonnegative`` makes it the
    inequality ``Z_g <= 1`` instead.
    """
    mu = mu + step_size * constraint_value
    return max(mu, 0.0) if nonnegative else mu


def log_uniform_mixture(expert_sequence_logprobs: torch.Tensor) -> torch.Tensor:
    """``log q(x) = log (1/K) sum_k pi_k(x)``. ``(B, K) -> (B,)``."""
    num_experts = expert_sequence_logprobs.shape[-1]
    return torch.logsumexp(expert_sequence_logprobs, dim=-1) - math.log(num_experts)


def importance_log_ratios(
    gated_logprobs: torch.Tensor, expert_sequence_logprobs: torch.Tensor
) -> torch.Tensor:
    """``log pi_g(x) / q(x)``. ``(B,)``, ``(B, K)`` -> ``(B,)``; at most ``log K``."""
    return gated_logprobs - log_uniform_mixture(expert_sequence_logprobs)


def estimate_normalizer(
    gated_logprobs: torch.Tensor, expert_sequence_logprobs: torch.Tensor
) -> torch.Tensor:
    """Importance-sampling estimate ``Z_hat = mean_{x ~ q} pi_g(x) / q(x)``. ``(B,), (B, K) -> ()``.

    Unbiased when the batch is drawn from q; differentiable in the gate. For
    any gate that does not read x (a constant one) every ratio is computed from
    the same weights, and ``E_q[Z_hat] = 1`` exactly.
    """
    log_ratios = importance_log_ratios(gated_logprobs, expert_sequence_logprobs)
    return torch.exp(torch.logsumexp(log_ratios, dim=0) - math.log(log_ratios.shape[0]))


def ema_update(previous: float, value: float, decay: float) -> float:
    """Exponential moving average; ``decay`` in [0, 1), 0 keeps only ``value``."""
    return decay * previous + (1 - decay) * value
