"""Distillation losses, pure functions in log space.

The teacher is gatemix's ensemble: its next-token distribution is the exact
mixture, so the student is trained on the full distribution rather than on a
top-k of it, and needs no "tail bucket" for mass outside the teacher's top-k.
"""

from __future__ import annotations

import math

import torch


def generalized_jsd_loss(
    student_logits: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    mask: torch.Tensor | None = None,
    beta: float = 0.0,
) -> torch.Tensor:
    """Token-averaged generalized Jensen-Shannon divergence.

    Shapes: ``(B, T, V)`` student logits, ``(B, T, V)`` teacher log-probs, ``(B, T)``
    mask of positions that count. ``beta = 0`` is the forward KL(teacher || student),
    ``beta = 1`` the reverse KL(student || teacher), values between interpolate
    through the mixture ``beta * teacher + (1 - beta) * student``.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1], got {beta}")
    student_logprobs = torch.log_softmax(student_logits.float(), dim=-1)
    teacher_logprobs = teacher_logprobs.float()
    if beta == 0.0:
        per_token = _kl(teacher_logprobs, student_logprobs)
    elif beta == 1.0:
        per_token = _kl(student_logprobs, teacher_logprobs)
    else:
        mixture = torch.logsumexp(
            torch.stack([teacher_logprobs + math.log(beta), student_logprobs + math.log(1 - beta)]), dim=0
        )
        per_token = beta * _kl(teacher_logprobs, mixture) + (1 - beta) * _kl(student_logprobs, mixture)
    if mask is None:
        return per_token.mean()
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp_min(1.0)


def _kl(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last axis, with 0 * log 0 = 0. ``(..., V) -> (...)``."""
    p = p_log.exp()
    terms = torch.where(p > 0, p * (p_log - q_log), torch.zeros_like(p))
    return terms.sum(-1)
