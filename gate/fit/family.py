"""Fitting the gate family (``registry.GATE_FAMILY``) by the paper's primal-dual game.

Every member is a ``HiddenStateRouter``, a per-token mixture, so it is a
distribution by construction (``Z = 1``, no mu) and the game runs directly on
its per-token mixture loss (the direct route): lambda plays the worst mixture
of domains, theta the router. For the learned posterior with forgetting 1 the
per-token mixture *is* the sequence-level constant gate ``pi_sigma``, so its game
is the paper's minimax game over constant gates, solved exactly as served.

The posterior's two kinds of parameters (the prior logits and the forgetting
factor) move on a scale far from the head's weights, so they get their own
learning rate and no weight decay: decay would pull the forgetting factor's
raw parameter to 0, a factor of 0.5, and the prior towards uniform.

The ERM baseline the report compares against is fitted here too: the same
game with lambda frozen at the data's token proportions, on cross-entropy.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from gatemix.gate.fit.config import PrimalDualConfig
from gatemix.gate.fit.game_data import GateFitData
from gatemix.gate.fit.primal_dual import PrimalDualResult, run_primal_dual
from gatemix.gate.fit.router_fit import routed_sequence_logprobs
from gatemix.gate.registry import GATE_FAMILY, POSTERIOR_PARAMETERS, FamilyMember
from gatemix.gate.router import HiddenStateRouter, RouterForm

logger = logging.getLogger(__name__)


def parameter_groups(router: HiddenStateRouter, posterior_learning_rate: float) -> list[dict]:
    """AdamW groups: the posterior's prior and forgetting apart (own lr, no decay), the head's rest."""
    posterior, head = [], []
    for name, parameter in router.named_parameters():
        if parameter.requires_grad:
            (posterior if name in POSTERIOR_PARAMETERS else head).append(parameter)
    groups = []
    if head:
        groups.append({"params": head})
    if posterior:
        groups.append({"params": posterior, "lr": posterior_learning_rate, "weight_decay": 0.0})
    return groups


def fit_router_game(
    router: HiddenStateRouter,
    data: GateFitData,
    config: PrimalDualConfig,
    *,
    posterior_learning_rate: float = 0.05,
    work_dir: Path | None = None,
    progress: bool = False,
    progress_label: str = "primal-dual",
) -> PrimalDualResult:
    """Fit ``router`` in place by the game on its per-token mixture loss (ERM when lambda is fixed)."""
    torch.manual_seed(config.seed)
    return run_primal_dual(
        router,
        data,
        config,
        sequence_logprob_fn=routed_sequence_logprobs,
        normalized=True,
        work_dir=work_dir,
        parameter_groups=parameter_groups(router, posterior_learning_rate),
        progress=progress,
        progress_label=progress_label,
    )


def member_summary(router: HiddenStateRouter, result: PrimalDualResult) -> dict:
    """What the artifact and the report say about one fitted member."""
    summary = {
        "lambda_avg": result.lambda_avg,
        "domain_losses_avg": result.domain_losses_avg,
        "gap": result.gap.to_dict() if result.gap is not None else None,
        "parameters": sum(p.numel() for p in router.parameters() if p.requires_grad),
    }
    if router.form.posterior:
        summary["prior"] = torch.softmax(router.prior_logits.detach().double(), -1).tolist()
        summary["forgetting"] = float(router.forgetting.detach())
    return summary


def fit_member(
    member: FamilyMember | str,
    data: GateFitData,
    hidden_sizes: list[int],
    config: PrimalDualConfig,
    *,
    router_hidden: int = 0,
    context_config: dict | None = None,
    posterior_learning_rate: float = 0.05,
    progress: bool = False,
) -> tuple[HiddenStateRouter, PrimalDualResult]:
    """One member of the family, fitted by the game from its starting point."""
    member = GATE_FAMILY[member] if isinstance(member, str) else member
    torch.manual_seed(config.seed)
    router = member.new_router(hidden_sizes, router_hidden, context_config)
    result = fit_router_game(
        router, data, config, posterior_learning_rate=posterior_learning_rate, progress=progress,
        progress_label=f"game: {member.name}",
    )
    logger.info(
        "%s: lambda_avg %s, %s", member.name, [round(v, 3) for v in result.lambda_avg],
        result.gap.summary() if result.gap is not None else "no gap check",
    )
    return router, result


def fit_family(
    data: GateFitData,
    hidden_sizes: list[int],
    config: PrimalDualConfig,
    *,
    members: tuple[str, ...] = tuple(GATE_FAMILY),
    router_hidden: int = 0,
    context_config: dict | None = None,
    posterior_learning_rate: float = 0.05,
    progress: bool = False,
) -> tuple[dict[str, HiddenStateRouter], dict[str, dict], dict[str, PrimalDualResult]]:
    """Every named member fitted by the game: routers, their summaries, their game results."""
    base = dataclasses.replace(config, checkpoint_every=0)
    routers, summaries, results = {}, {}, {}
    for name in members:
        router, result = fit_member(
            name, data, hidden_sizes, base, router_hidden=router_hidden,
            context_config=context_config, posterior_learning_rate=posterior_learning_rate,
            progress=progress,
        )
        routers[name], results[name] = router, result
        summaries[name] = member_summary(router, result)
    return routers, summaries, results


def fit_router_directly(
    data: GateFitData, form: RouterForm, config: PrimalDualConfig, work_dir: Path | None = None
) -> tuple[HiddenStateRouter, dict]:
    """A head router (of ``form``) trained by the game itself from uniform (ERM when lambda is fixed)."""
    torch.manual_seed(config.seed)
    router = HiddenStateRouter(form).set_constant(torch.ones(form.num_experts))
    result = fit_router_game(router, data, config, work_dir=work_dir)
    return router, member_summary(router, result)


def token_proportions(data: GateFitData) -> tuple[float, ...]:
    """Token proportions of the domains in the fit data (ERM's lambda)."""
    tokens = torch.zeros(data.num_domains, dtype=torch.float64).index_add(
        0, data.tensors["domain"], data.tensors["num_tokens"].double()
    )
    weights = tokens / tokens.sum()
    return tuple(float(w) for w in weights[:-1]) + (1.0 - float(weights[:-1].sum()),)


def fit_erm_router(
    data: GateFitData,
    hidden_sizes: list[int],
    config: PrimalDualConfig,
    *,
    router_hidden: int = 0,
    context_config: dict | None = None,
) -> HiddenStateRouter:
    """The ERM baseline: a head router fitted on cross-entropy with lambda fixed at the data's mix."""
    form = RouterForm.for_experts(
        hidden_sizes, router_hidden=router_hidden, context_config=context_config
    )
    erm_config = dataclasses.replace(
        config, fixed_lambda=token_proportions(data), loss="cross_entropy", checkpoint_every=0
    )
    router, _ = fit_router_directly(data, form, erm_config)
    return router
