"""Which candidate serves: a share of each domain's gate sequences held out of every fit.

Every candidate (each family member, the two-stage router) is scored on the
held-out share, and the one with the lowest worst-domain excess is served.
"""

from __future__ import annotations

import torch

from gatemix.errors import UserError
from gatemix.gate.fit.evaluate import evaluate_methods
from gatemix.gate.registry import GATES
from gatemix.gate.router import HiddenStateRouter
from gatemix.gate.token_features import TokenFeatures


class SelectionError(UserError):
    """A domain with too few gate sequences to hold any out."""


def split_for_selection(
    features: dict[str, TokenFeatures], fraction: float, seed: int
) -> tuple[dict[str, TokenFeatures], dict[str, TokenFeatures] | None]:
    """Hold ``fraction`` of each domain's sequences out of every fit (seeded), to pick the router."""
    if fraction == 0:
        return features, None
    generator = torch.Generator().manual_seed(seed)
    fit_part, selection_part = {}, {}
    for domain, part in features.items():
        count = part.input_ids.shape[0]
        if count < 2:
            raise SelectionError(f"domain {domain!r} has {count} gate sequence(s); selection needs 2")
        order = torch.randperm(count, generator=generator)
        held = min(count - 1, max(1, round(fraction * count)))
        selection_part[domain] = part.select(order[:held])
        fit_part[domain] = part.select(order[held:])
    return fit_part, selection_part


def select_router(
    candidates: dict[str, HiddenStateRouter], selection: dict[str, TokenFeatures]
) -> tuple[str, dict]:
    """The candidate with the lowest worst-domain excess on the held-out sequences (ties: first)."""
    report = evaluate_methods(
        selection, {name: GATES["learned"](router) for name, router in candidates.items()}
    )
    figures = {
        name: {
            "worst_excess": report.methods[name].worst_excess,
            "excess": dict(zip(report.domains, report.methods[name].excess)),
        }
        for name in candidates
    }
    chosen = min(candidates, key=lambda name: figures[name]["worst_excess"])
    return chosen, figures
