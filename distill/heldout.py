"""The held-out figures a run tracks: per-domain KL to the teacher and cross-entropy on the eval split.

KL is the forward KL(teacher || student) on the teacher's targets, per
position (nats/token); with a top-k teacher it is the tail-bucket KL, a lower
bound of the full one. Cross-entropy is the student's next-token loss on the
eval text itself. Each process scores its share of the eval windows and the
sums are added across processes, so every process sees the same figures.
"""

from __future__ import annotations

import torch

from gatemix.distill.data import WindowSet
from gatemix.distill.distributed import Distributed
from gatemix.distill.loss import next_token_logprobs, per_token_divergence
from gatemix.distill.teacher_cache import TeacherTargetSource


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DDP wrapper (or the model)."""
    return getattr(model, "module", model)


@torch.no_grad()
def evaluate_student(
    model: torch.nn.Module,
    windows: WindowSet,
    targets: TeacherTargetSource | None,
    *,
    dist: Distributed,
    device: str,
    batch_size: int,
) -> dict:
    """``{"kl": {domain: nats/token} | None, "ce": {...}, "mean_kl", "mean_ce"}`` over ``windows``."""
    model = unwrap(model)
    was_training = model.training
    model.eval()
    num_domains = len(windows.domains)
    # rows: KL sum, KL positions, CE sum, CE positions; one column per domain
    sums = torch.zeros(4, num_domains, dtype=torch.float64, device=device)
    mine = torch.arange(len(windows))[dist.rank::dist.world_size]
    domain_of = windows.domain_ids()
    for start in range(0, len(mine), batch_size):
        window_ids = mine[start : start + batch_size]
        input_ids = windows.batch(window_ids)
        domains = domain_of[window_ids].to(device)
        logits = model(input_ids=input_ids.to(device)).logits
        ce = -next_token_logprobs(logits, input_ids.to(device))  # (b, T-1)
        sums[2].index_add_(0, domains, ce.double().sum(1))
        sums[3].index_add_(0, domains, torch.full_like(domains, ce.shape[1], dtype=torch.float64))
        if targets is not None:
            teacher = targets.for_windows(window_ids, input_ids).to(device)
            kl = per_token_divergence(logits, teacher, beta=0.0)  # (b, T)
            sums[0].index_add_(0, domains, kl.double().sum(1))
            sums[1].index_add_(0, domains,
                               torch.full_like(domains, kl.shape[1], dtype=torch.float64))
    sums = dist.sum(sums).cpu()
    model.train(was_training)
    ce = {d: float(sums[2, j] / sums[3, j]) for j, d in enumerate(windows.domains)}
    result = {"ce": ce, "mean_ce": float(sums[2].sum() / sums[3].sum()), "kl": None,
              "mean_kl": None}
    if targets is not None:
        result["kl"] = {d: float(sums[0, j] / sums[1, j]) for j, d in enumerate(windows.domains)}
        result["mean_kl"] = float(sums[0].sum() / sums[1].sum())
    return result
