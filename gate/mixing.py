"""The mixture math, shared by the engine, the offline fit and the tests.

Everything stays in log space: experts can put (numerically) zero mass on a
token and gates can put exactly zero weight on an expert, and both must come
out as -inf rather than NaN.
"""

from __future__ import annotations

import torch

# Stands in for log 0 where a log weight must stay a finite number (a router bias, the
# engine's packed weights): exp(-1e4) is exactly 0 in float32.
LOG_WEIGHT_FLOOR = -1e4

# Terms of a log-sum-exp this far below the largest are summed as exp(-80) ~ 2e-35: the sum is
# >= 1, so the float32 (and float64) result is unchanged, and exp never sees an argument whose
# result is denormal or zero, where CPU exp kernels fall off their vectorized path.
LOGSUMEXP_FLOOR = -80.0


def logsumexp(terms: torch.Tensor, dim: int) -> torch.Tensor:
    """``torch.logsumexp(terms, dim)``, at the same speed whatever the spread of the terms.

    A mixture's log weights are often far apart (a posterior gate after a long
    prefix puts experts at log weight -100 and below), and on CPU ``exp`` of
    such arguments runs many times slower than of moderate ones; this floors
    each term at ``LOGSUMEXP_FLOOR`` below the largest before ``exp`` (see
    there). All -inf gives -inf and a +inf term +inf, as ``torch.logsumexp``.
    """
    largest = terms.detach().amax(dim, keepdim=True)
    shifted = terms - largest  # NaN where the largest is infinite: fixed below
    if shifted.requires_grad:
        total = shifted.clamp_min(LOGSUMEXP_FLOOR).exp().sum(dim).log()
    else:  # in place: one temporary of the terms' size, not three
        total = shifted.clamp_min_(LOGSUMEXP_FLOOR).exp_().sum(dim).log_()
    largest = largest.squeeze(dim)
    out = total + largest
    return torch.where(out.isnan(), largest, out)


def mix_logprobs(expert_logprobs: torch.Tensor, log_weights: torch.Tensor) -> torch.Tensor:
    """Exact mixture ``log sum_k w_k p_k(y)``.

    Shapes: ``(..., K, V)`` and ``(..., K)`` -> ``(..., V)``. ``expert_logprobs``
    must already be normalized over V and ``log_weights`` over K.
    """
    return logsumexp(expert_logprobs + log_weights.unsqueeze(-1), dim=-2)


def mix_logits(expert_logits: torch.Tensor, log_weights: torch.Tensor) -> torch.Tensor:
    """The mixture from raw expert logits, with the log-softmax folded into the mix.

    ``log sum_k w_k softmax(z_k)(y) = logsumexp_k(z_k(y) + log w_k - lse_k)``,
    where ``lse_k = logsumexp_y z_k(y)``: the per-expert normalizer is a ``(..., K)``
    offset, so no ``(..., K, V)`` log-softmax is materialized (one fewer pass and
    temporary over K x vocab than ``mix_logprobs(log_softmax(z))``). The engine
    runs it compiled; eager, the two-pass form is as fast or faster on CPU
    (``gatemix bench mixing``). Shapes: ``(..., K, V)``, ``(..., K)`` -> ``(..., V)``.
    Computed in float32 whatever the input dtype, since the mixture is what the
    sampler sees.
    """
    logits = expert_logits.float()
    offsets = log_weights.float() - torch.logsumexp(logits, dim=-1)  # (..., K)
    # An expert with zero weight has offset -inf; it must add nothing, not NaN.
    return logsumexp(logits + offsets.unsqueeze(-1), dim=-2)


def mix_logits_two_pass(expert_logits: torch.Tensor, log_weights: torch.Tensor) -> torch.Tensor:
    """The unfused form: log-softmax each expert, then mix. The engine's eager form."""
    expert_logprobs = torch.log_softmax(expert_logits.float(), dim=-1)
    return mix_logprobs(expert_logprobs, log_weights.float())


def mix_sequence_logprobs(
    expert_sequence_logprobs: torch.Tensor, log_gate: torch.Tensor
) -> torch.Tensor:
    """Sequence-level gated model ``log pi_g(x) = logsumexp_k(log g(x,k) + log pi_k(x))``.

    Shapes: ``(B, K)``, ``(B, K)`` -> ``(B,)``.
    """
    return torch.logsumexp(expert_sequence_logprobs + log_gate, dim=-1)


def normalize_log_weights(log_weights: torch.Tensor) -> torch.Tensor:
    """Project unnormalized log weights onto the simplex. ``(..., K) -> (..., K)``."""
    return log_weights - torch.logsumexp(log_weights, dim=-1, keepdim=True)


def log_weights_from_probs(weights: torch.Tensor) -> torch.Tensor:
    """Non-negative weights with a positive sum -> normalized log weights.

    Zero weights become -inf, which ``mix_logprobs`` handles exactly.
    """
    if (weights < 0).any() or not torch.isfinite(weights).all():
        raise ValueError("mixture weights must be finite and non-negative")
    total = weights.sum(dim=-1, keepdim=True)
    if (total <= 0).any():
        raise ValueError("mixture weights must have a positive sum")
    return torch.log(weights / total)


def restrict_log_weights(log_weights: torch.Tensor, expert_mask: torch.Tensor) -> torch.Tensor:
    """Renormalize ``(..., K)`` log weights over the experts where ``expert_mask`` is True.

    Rows whose allowed experts all have zero weight fall back to uniform over the
    allowed set, so a restriction never produces an all -inf row.
    """
    masked = log_weights.masked_fill(~expert_mask, float("-inf"))
    all_dead = torch.isinf(masked).all(dim=-1, keepdim=True)
    uniform = torch.zeros_like(masked).masked_fill(~expert_mask, float("-inf"))
    return normalize_log_weights(torch.where(all_dead, uniform, masked))
