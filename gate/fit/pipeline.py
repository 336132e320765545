"""``gatemix fit-gate``: the robust gate on a project's experts and data, in named stages.

0. ``fit_inputs`` (``gate/fit/inputs.py``): the experts' features on each
   domain's gate (and eval) text, cached on disk and sharded across processes
   under ``torchrun``; the pool of draws from ``q`` (two-stage route only); the
   held-out selection share.
1. ``fit_sequence_gate`` (the two-stage route): the sequence-level gate, fitted
   by the primal-dual game against the worst mixture of domains (checkpointed,
   resumable). Its end state is saved (``sequence_gate.pt``, ``game.json``), so
   ``load_sequence_gate`` can hand it to the next stage without replaying it.
2. ``fit_candidates``: the gate family (``gate/fit/family.py``), every member
   fitted by the game directly, and the two-stage router fitted to stage 1's
   gate (``gate/fit/router_fit.py``).
3. ``choose_router``: the candidate with the lowest held-out worst-domain excess.
4. ``write_artifact``: the evaluation against every baseline (optional; the ERM
   baseline is fitted for it) and the versioned router artifact ``gatemix pack`` accepts.

``gatemix fit-gate --stage router`` runs 0, then 2-4 over the saved stage 1
(``--stage all``, the default, runs every stage).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from gatemix.atomic_write import atomic_file, write_atomically
from gatemix.gate.artifact import RouterArtifact, save_router
from gatemix.gate.fit.config import FIT_STAGES, FitGateConfig
from gatemix.gate.fit.convergence import SEQUENCE_GATE_PLOT, member_plot_file, plot_history
from gatemix.gate.fit.family import fit_erm_router, fit_family
from gatemix.gate.fit.inputs import (
    FitGateError,
    FitInputs,
    artifact_dir,
    fit_inputs,
    fit_work_dir,
    router_context_config,
    served_name,
)
from gatemix.gate.fit.primal_dual import run_primal_dual
from gatemix.gate.fit.report import evaluate_fit
from gatemix.gate.fit.router_fit import fit_router
from gatemix.gate.fit.selection import select_router
from gatemix.gate.fit.sequence_gate import SequenceGate, SequenceGateForm
from gatemix.gate.router import HiddenStateRouter

logger = logging.getLogger(__name__)

SEQUENCE_GATE_FILE = "sequence_gate.pt"
GAME_FILE = "game.json"  # the game's averaged end state, what stage 2 reads
# The router stage's statistics keep the key old artifacts and reports use.
ROUTER_STATS_KEY = "distillation"


@dataclass
class SequenceGateFit:
    """Stage 1's result: the fitted sequence gate and the game's averaged iterates."""

    gate: SequenceGate
    lambda_avg: list[float]
    mu_avg: float
    z_avg: float
    domain_losses_avg: list[float]
    gap: dict | None = None  # the final duality-gap check of the averaged iterates


def fit_sequence_gate(config: FitGateConfig, inputs: FitInputs, work_dir: Path) -> SequenceGateFit:
    """Stage 1: the primal-dual game; its end state is saved for ``load_sequence_gate``."""
    torch.manual_seed(config.seed)
    gate = SequenceGate(sequence_gate_form(config, inputs))
    result = run_primal_dual(
        gate, inputs.data, config.primal_dual(), work_dir=work_dir / "gate",
        progress=config.progress,
    )
    plot_history(result.history, work_dir / SEQUENCE_GATE_PLOT, inputs.domains,
                 config.average_from, result.gap)
    logger.info("lambda_avg %s, Z_avg %.4f, mu_avg %.4f; %s", result.lambda_avg, result.z_avg,
                result.mu_avg, result.gap.summary())
    fitted = SequenceGateFit(
        gate, result.lambda_avg, result.mu_avg, result.z_avg, result.domain_losses_avg,
        result.gap.to_dict(),
    )
    with atomic_file(work_dir / SEQUENCE_GATE_FILE) as temp:
        torch.save(gate.state_dict(), temp)
    game = {name: getattr(fitted, name) for name in ("lambda_avg", "mu_avg", "z_avg", "domain_losses_avg", "gap")}
    game.update(steps=config.steps, data_hash=inputs.data.fingerprint)
    write_atomically(work_dir / GAME_FILE, json.dumps(game, indent=2))
    return fitted


def sequence_gate_form(config: FitGateConfig, inputs: FitInputs) -> SequenceGateForm:
    return SequenceGateForm(
        vocab_size=len(inputs.bank.tokenizer),
        num_experts=len(inputs.domains),
        width=config.gate_width,
        num_layers=config.gate_layers,
        num_heads=config.gate_heads,
        max_length=config.max_length + config.sample_length + 1,
        pooling=config.gate_pooling,
    )


def load_sequence_gate(config: FitGateConfig, inputs: FitInputs, work_dir: Path) -> SequenceGateFit:
    """Stage 1's saved result, refused if it is unfinished or was fitted on other data."""
    gate_path, game_path = work_dir / SEQUENCE_GATE_FILE, work_dir / GAME_FILE
    if not gate_path.is_file() or not game_path.is_file():
        raise FitGateError(f"no finished fit in {work_dir}: run `gatemix fit-gate` with these paths first")
    game = json.loads(game_path.read_text())
    if game.get("data_hash") != inputs.data.fingerprint:
        raise FitGateError(f"the fit in {work_dir} was made on other experts or data: run `gatemix fit-gate` again")
    gate = SequenceGate(sequence_gate_form(config, inputs))
    gate.load_state_dict(torch.load(gate_path, weights_only=True))
    return SequenceGateFit(gate, game["lambda_avg"], game["mu_avg"], game["z_avg"],
                           game["domain_losses_avg"], game.get("gap"))


def fit_two_stage_router(
    config: FitGateConfig, inputs: FitInputs, fitted: SequenceGateFit
) -> tuple[HiddenStateRouter, dict]:
    """The paper's route: the head router fitted to the sequence gate (samples of it, or data)."""
    return fit_router(
        inputs.bank,
        fitted.gate,
        config.router_fit(router_context_config(config, inputs.bank)),
        domain_features=list(inputs.fit_features.values()),
        lambdas=fitted.lambda_avg,
        proposals=inputs.q_pool,
    )


def fit_candidates(
    config: FitGateConfig, inputs: FitInputs, fitted: SequenceGateFit | None, work_dir: Path
) -> tuple[dict[str, HiddenStateRouter], dict]:
    """Stage 2: every family member by the game (direct route), and the two-stage router.

    Each member's game is plotted to ``primal_dual_<member>.png`` beside stage 1's plot.
    """
    routers, stats = {}, {}
    if config.direct_router and config.family:
        routers, stats["family"], results = fit_family(
            inputs.data,
            inputs.bank.hidden_sizes,
            config.router_game(),
            members=tuple(config.family),
            router_hidden=config.router_hidden,
            context_config=router_context_config(config, inputs.bank),
            posterior_learning_rate=config.posterior_learning_rate,
            progress=config.progress,
        )
        for name, result in results.items():
            plot_history(result.history, work_dir / member_plot_file(name), inputs.domains,
                         config.average_from, result.gap)
    if fitted is not None:
        routers["two_stage"], stats[ROUTER_STATS_KEY] = fit_two_stage_router(config, inputs, fitted)
    return routers, stats


def choose_router(
    config: FitGateConfig, inputs: FitInputs, routers: dict[str, HiddenStateRouter]
) -> tuple[str, dict | None]:
    """Stage 3: the router to serve, and the held-out figures that chose it."""
    if served_name(config) != "best":
        return served_name(config), None
    served, selection = select_router(routers, inputs.selection_features)
    logger.info("serving %s (held-out worst-domain excess %.4f)", served,
                selection[served]["worst_excess"])
    return served, selection


def artifact_details(
    config: FitGateConfig,
    inputs: FitInputs,
    fitted: SequenceGateFit | None,
    served: str,
    selection: dict | None,
    stats: dict,
) -> dict:
    """What the artifact (and ``fit_summary.json``) says about the fit that made it."""
    served_stats = stats.get("family", {}).get(served, {})
    details = {
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.to_dict().items()},
        "project": str(inputs.project.path),
        # The served router's game (for the two-stage router: the sequence gate's).
        "lambda_avg": served_stats.get("lambda_avg") or (fitted.lambda_avg if fitted else None),
        "data_hash": inputs.data.fingerprint,
        "family": stats.get("family", {}),
        ROUTER_STATS_KEY: stats.get(ROUTER_STATS_KEY),
        "served_router": served,
        "selection": selection,
    }
    if fitted is not None:
        details["sequence_gate"] = {
            "lambda_avg": fitted.lambda_avg, "mu_avg": fitted.mu_avg, "z_avg": fitted.z_avg,
            "domain_excess": dict(zip(inputs.domains, fitted.domain_losses_avg)), "gap": fitted.gap,
            "parameters": fitted.gate.num_parameters(),
        }
    return details


def evaluate_candidates(
    config: FitGateConfig,
    inputs: FitInputs,
    fitted: SequenceGateFit | None,
    routers: dict[str, HiddenStateRouter],
    served: str,
    stats: dict,
    work_dir: Path,
) -> dict:
    """The ERM baseline fitted, then every router and baseline scored (``report.md``)."""
    erm_router = fit_erm_router(
        inputs.data, inputs.bank.hidden_sizes, config.router_game(),
        router_hidden=config.router_hidden,
        context_config=router_context_config(config, inputs.bank),
    )
    gate = fitted.gate if fitted is not None else None
    return evaluate_fit(config, inputs, routers, served, gate, stats, work_dir, erm_router=erm_router)


def write_artifact(
    config: FitGateConfig,
    inputs: FitInputs,
    fitted: SequenceGateFit | None,
    routers: dict[str, HiddenStateRouter],
    served: str,
    selection: dict | None,
    stats: dict,
    work_dir: Path,
) -> RouterArtifact:
    """Stage 4: evaluate (optionally) and write the router artifact for ``gatemix pack``."""
    details = artifact_details(config, inputs, fitted, served, selection, stats)
    if config.evaluate:
        if fitted is not None:
            stats = {**stats, "sequence_gate": details["sequence_gate"]}
        details["evaluation"] = evaluate_candidates(
            config, inputs, fitted, routers, served, stats, work_dir
        )
    artifact = RouterArtifact(
        router=routers[served],
        expert_names=inputs.domains,
        expert_hashes=dict(zip(inputs.domains, inputs.bank.hashes)),
        method="robust",
        details=details,
    )
    out_dir = artifact_dir(config, inputs.project)
    saved = save_router(artifact, out_dir)
    (work_dir / "fit_summary.json").write_text(json.dumps(details, indent=2, default=str))
    logger.info("router artifact %s written to %s", saved.version, out_dir)
    return saved


def fit_gate(config: FitGateConfig, stage: str = "all") -> RouterArtifact | None:
    """Every stage, or (``stage="router"``) stages 2-4 over a finished stage 1, not replayed.

    Under a sharded launch, ranks other than 0 stop after scoring (None).
    """
    if stage not in FIT_STAGES:
        raise FitGateError(f"unknown stage {stage!r}; known: {list(FIT_STAGES)}")
    if stage == "router" and not config.two_stage:
        raise FitGateError("--stage router redoes the two-stage route: it needs two_stage on")
    inputs = fit_inputs(config)
    if inputs is None:
        return None
    work_dir = fit_work_dir(config, inputs.project)
    if stage == "router":
        fitted = load_sequence_gate(config, inputs, work_dir)
    else:
        fitted = fit_sequence_gate(config, inputs, work_dir) if config.two_stage else None
    routers, stats = fit_candidates(config, inputs, fitted, work_dir)
    served, selection = choose_router(config, inputs, routers)
    return write_artifact(config, inputs, fitted, routers, served, selection, stats, work_dir)
