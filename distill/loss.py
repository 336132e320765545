"""Distillation losses and the teacher's targets, pure functions in log space.

The teacher's next-token distribution reaches the loss either whole (``(B, T, V)``
log-probs, exact) or as its top-k tokens plus one **tail bucket** holding the
rest of its mass, as TRL's server distillation does for a vLLM teacher. The
student is then compared on the same ``k + 1`` buckets: its own top-k
log-probs at the teacher's token ids and the log of its remaining mass. That
is a coarsening of both distributions, so every divergence here is a lower
bound of the full one (data processing), and it equals the full one when k
covers the vocabulary: the tail then holds no mass on either side.

Forward KL, reverse KL and the generalized JSD are one family (TRL's
``generalized_jsd_loss``): ``beta = 0`` is KL(teacher || student), ``beta = 1``
KL(student || teacher), values between interpolate through the mixture
``beta * teacher + (1 - beta) * student``.

Total variation, ``0.5 * sum |p - q|``, stands apart: ``1 - TV`` is the
chance that a speculative-decoding draft's token is accepted by the target at
temperature 1 (``distill/acceptance.py``), so ``--loss tv`` trains the student
as a draft directly. Over the k + 1 buckets it is a lower bound of the full TV
too (merging tokens can only cancel differences), exact with dense targets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# The log of an empty bucket where it must stay finite for the gradient: a logsumexp
# over only -inf has a NaN gradient, over only this floor a zero one; exp() of it is 0.
EMPTY_LOG_MASS = -1e4

# The loss names of ``DistillConfig.loss`` that take a teacher -> generalized JSD beta.
DIVERGENCE_BETA = {"forward_kl": 0.0, "reverse_kl": 1.0}

# The divergences ``per_token_divergence`` takes: the generalized JSD family (with a beta)
# and total variation (``--loss tv``).
DIVERGENCE_KINDS = ("jsd", "tv")


@dataclass
class TeacherTargets:
    """The teacher's next-token distribution at every position of a batch.

    Dense: ``indices`` is None and ``logprobs`` is ``(B, T, V)``. Top-k:
    ``indices`` ``(B, T, k)`` token ids and ``logprobs`` ``(B, T, k + 1)``, the
    last column the log of the tail bucket's mass.
    """

    indices: torch.Tensor | None
    logprobs: torch.Tensor

    @property
    def is_dense(self) -> bool:
        return self.indices is None

    def to(self, device: str | torch.device) -> TeacherTargets:
        indices = None if self.indices is None else self.indices.to(device)
        return TeacherTargets(indices, self.logprobs.to(device))

    @staticmethod
    def concat(parts: list[TeacherTargets]) -> TeacherTargets:
        """Rows of several batches, in order; all dense or all top-k of one k."""
        if any(part.is_dense != parts[0].is_dense for part in parts):
            raise ValueError("cannot concatenate dense and top-k targets")
        indices = None if parts[0].is_dense else torch.cat([p.indices for p in parts])
        return TeacherTargets(indices, torch.cat([p.logprobs for p in parts]))

    def select(self, rows: torch.Tensor) -> TeacherTargets:
        return TeacherTargets(None if self.indices is None else self.indices[rows],
                              self.logprobs[rows])


def teacher_targets(teacher_logprobs: torch.Tensor, top_k: int) -> TeacherTargets:
    """``(B, T, V)`` log-probs -> dense targets when k is 0 or >= V, else top-k with a tail."""
    if top_k == 0 or top_k >= teacher_logprobs.shape[-1]:
        return TeacherTargets(None, teacher_logprobs.float())
    return top_k_with_tail(teacher_logprobs, top_k)


def top_k_with_tail(teacher_logprobs: torch.Tensor, top_k: int) -> TeacherTargets:
    """The k most likely tokens and one tail bucket: ``(B, T, V)`` -> ``(B, T, k + 1)``."""
    top_logprobs, indices = torch.topk(teacher_logprobs.float(), top_k, dim=-1)  # (B, T, k)
    tail = bucket_tail(teacher_logprobs.float(), indices)  # (B, T)
    return TeacherTargets(indices, torch.cat([top_logprobs, tail.unsqueeze(-1)], dim=-1))


def bucket_tail(logprobs: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Log of the mass outside ``indices``: ``(B, T, V)``, ``(B, T, k)`` -> ``(B, T)``.

    Summed over the other tokens rather than as ``log(1 - sum(top))``, which
    loses all precision when the top-k hold nearly all the mass.
    """
    outside = logprobs.scatter(-1, indices, EMPTY_LOG_MASS)
    return torch.logsumexp(outside, dim=-1).clamp_min(EMPTY_LOG_MASS)


def student_buckets(student_logprobs: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The student on the teacher's buckets: ``(B, T, V)``, ``(B, T, k)`` -> ``(B, T, k + 1)``."""
    top = student_logprobs.gather(-1, indices)
    return torch.cat([top, bucket_tail(student_logprobs, indices).unsqueeze(-1)], dim=-1)


def _kl(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last axis, with 0 * log 0 = 0. ``(..., V) -> (...)``.

    The masked-out terms are computed on zeros, not on -inf, so their gradient
    is 0 rather than NaN (``where`` does not stop a NaN from the other branch).
    """
    p = p_log.exp()
    present = p > 0
    zero = torch.zeros_like(p)
    p_log_safe = torch.where(present, p_log, zero)
    q_log_safe = torch.where(present, q_log, zero)
    return torch.where(present, p * (p_log_safe - q_log_safe), zero).sum(-1)


def divergence(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor,
               beta: float) -> torch.Tensor:
    """Per-position generalized JSD between two normalized distributions. ``(..., V) -> (...)``."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1], got {beta}")
    student_logprobs, teacher_logprobs = student_logprobs.float(), teacher_logprobs.float()
    if beta == 0.0:
        return _kl(teacher_logprobs, student_logprobs)
    if beta == 1.0:
        return _kl(student_logprobs, teacher_logprobs)
    mixture = torch.logsumexp(torch.stack(
        [teacher_logprobs + math.log(beta), student_logprobs + math.log(1 - beta)]), dim=0)
    return beta * _kl(teacher_logprobs, mixture) + (1 - beta) * _kl(student_logprobs, mixture)


def total_variation(student_logprobs: torch.Tensor,
                    teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """``0.5 * sum |p - q|`` between two normalized distributions, in [0, 1]. ``(..., V) -> (...)``.

    Its gradient is bounded and finite everywhere (``abs`` has gradient 0 at 0),
    and a bucket at ``EMPTY_LOG_MASS`` or -inf contributes exp() = 0.
    """
    difference = student_logprobs.float().exp() - teacher_logprobs.float().exp()  # (..., V)
    return 0.5 * difference.abs().sum(-1)


def masked_mean(per_token: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return per_token.mean()
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp_min(1.0)


def generalized_jsd_loss(
    student_logits: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    mask: torch.Tensor | None = None,
    beta: float = 0.0,
) -> torch.Tensor:
    """Token-averaged generalized JSD against a dense teacher.

    Shapes: ``(B, T, V)`` student logits, ``(B, T, V)`` teacher log-probs, ``(B, T)``
    mask of positions that count.
    """
    student_logprobs = torch.log_softmax(student_logits.float(), dim=-1)
    return masked_mean(divergence(student_logprobs, teacher_logprobs, beta), mask)


def per_token_divergence(student_logits: torch.Tensor, targets: TeacherTargets,
                         beta: float, kind: str = "jsd") -> torch.Tensor:
    """``(B, T, V)`` logits against dense or top-k targets -> ``(B, T)`` divergences.

    ``kind`` is one of ``DIVERGENCE_KINDS``: "jsd" (generalized JSD with ``beta``)
    or "tv" (total variation; ``beta`` is not used).
    """
    if kind not in DIVERGENCE_KINDS:
        raise ValueError(f"divergence kind must be one of {', '.join(DIVERGENCE_KINDS)}")
    student_logprobs = torch.log_softmax(student_logits.float(), dim=-1)  # (B, T, V)
    if not targets.is_dense:
        student_logprobs = student_buckets(student_logprobs, targets.indices)  # (B, T, k + 1)
    if kind == "tv":
        return total_variation(student_logprobs, targets.logprobs)
    return divergence(student_logprobs, targets.logprobs, beta)


def distillation_loss(
    student_logits: torch.Tensor,
    targets: TeacherTargets,
    mask: torch.Tensor | None = None,
    beta: float = 0.0,
    kind: str = "jsd",
) -> torch.Tensor:
    """Token-averaged divergence (``kind``: generalized JSD or TV) against dense or top-k targets."""
    return masked_mean(per_token_divergence(student_logits, targets, beta, kind), mask)


def next_token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Log-prob of each next token: ``(B, T, V)``, ``(B, T)`` -> ``(B, T - 1)``."""
    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return logprobs.gather(-1, input_ids[:, 1:, None]).squeeze(-1)


def cross_entropy_loss(logits: torch.Tensor, input_ids: torch.Tensor,
                       rows: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy on the sequences' own tokens, nats/token.

    ``rows`` ``(B,)`` bool, when given: only those sequences count (the data's,
    not the student's own on-policy samples).
    """
    token_logprobs = next_token_logprobs(logits, input_ids)  # (B, T-1)
    if rows is None:
        return -token_logprobs.mean()
    return -masked_mean(token_logprobs, rows[:, None].expand_as(token_logprobs))
