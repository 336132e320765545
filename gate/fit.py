"""``gatemix fit-gate``: the robust gate on a project's experts and data, in named stages.

0. ``fit_inputs`` (``gate/fit_inputs.py``): the experts' features on each
   domain's gate (and eval) text, cached on disk and sharded across processes
   under ``torchrun``; the pool of draws from ``q`` (two-stage route only); the
   held-out selection share.
1. ``fit_sequence_gate`` (the two-stage route): the sequence-level gate, fitted
   by the primal-dual game against the worst mixture of domains (checkpointed,
   resumable). Its end state is saved (``sequence_gate.pt``, ``game.json``), so
   ``load_sequence_gate`` can hand it to the next stage without replaying it.
2. ``fit_candidates``: the gate family (``gate/family.py``), every member
   fitted by the game directly, and the two-stage router distilled from stage 1.
3. ``choose_router``: the candidate with the lowest held-out worst-domain excess.
4. ``write_artifact``: the evaluation against every baseline (optional) and
   the versioned router artifact ``gatemix pack`` accepts.

``gatemix distill-gate`` runs 0, then 2-4 over the saved stage 1.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from gatemix.gate.artifact import RouterArtifact, save_router
from gatemix.gate.config import FitGateConfig, PrimalDualConfig
from gatemix.gate.convergence import plot_history
from gatemix.gate.distill_router import distill_router
from gatemix.gate.family import fit_family
from gatemix.gate.features import HFExpertBank
from gatemix.gate.fit_inputs import (
    FitGateError,
    FitInputs,
    artifact_dir,
    fit_inputs,
    fit_work_dir,
    served_name,
)
from gatemix.gate.primal_dual import run_primal_dual
from gatemix.gate.router import HiddenStateRouter, context_config_like
from gatemix.gate.selection import select_router
from gatemix.gate.sequence_gate import SequenceGate, SequenceGateForm

logger = logging.getLogger(__name__)

SEQUENCE_GATE_FILE = "sequence_gate.pt"
GAME_FILE = "game.json"  # the game's averaged end state, what stage 2 reads


@dataclass
class SequenceGateFit:
    """Stage 1's result: the fitted sequence gate and the game's averaged iterates."""

    gate: SequenceGate
    lambda_avg: list[float]
    mu_avg: float
    z_avg: float
    domain_losses_avg: list[float]
    gap: dict | None = None  # the final duality-gap check of the averaged iterates


def primal_dual_part(config: FitGateConfig) -> PrimalDualConfig:
    names = {f.name for f in dataclasses.fields(PrimalDualConfig)}
    return PrimalDualConfig(**{k: v for k, v in config.to_dict().items() if k in names})


def router_game_part(config: FitGateConfig) -> PrimalDualConfig:
    """The games of the routers: the loop's settings with the routers' own learning rate."""
    return dataclasses.replace(primal_dual_part(config), learning_rate=config.router_learning_rate)


def fit_sequence_gate(config: FitGateConfig, inputs: FitInputs, work_dir: Path) -> SequenceGateFit:
    """Stage 1: the primal-dual game; its end state is saved for ``load_sequence_gate``."""
    torch.manual_seed(config.seed)
    gate = SequenceGate(sequence_gate_form(config, inputs))
    result = run_primal_dual(
        gate, inputs.data, primal_dual_part(config), work_dir=work_dir / "gate",
        progress=config.progress,
    )
    plot_history(result.history, work_dir / "primal_dual.png", inputs.domains,
                 config.average_from, result.gap)
    logger.info("lambda_avg %s, Z_avg %.4f, mu_avg %.4f; %s", result.lambda_avg, result.z_avg,
                result.mu_avg, result.gap.summary())
    fitted = SequenceGateFit(
        gate, result.lambda_avg, result.mu_avg, result.z_avg, result.domain_losses_avg,
        result.gap.to_dict(),
    )
    torch.save(gate.state_dict(), work_dir / SEQUENCE_GATE_FILE)
    game = {name: getattr(fitted, name) for name in ("lambda_avg", "mu_avg", "z_avg", "domain_losses_avg", "gap")}
    game.update(steps=config.steps, data_hash=inputs.data.fingerprint)
    (work_dir / GAME_FILE).write_text(json.dumps(game, indent=2))
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


def router_context_config(config: FitGateConfig, bank: HFExpertBank) -> dict | None:
    """The router's own causal Llama, shaped like the first expert, or None for a head only."""
    if not config.router_context_layers:
        return None
    return context_config_like(
        bank.models[0].config.to_dict(),
        config.router_context_layers,
        config.router_context_intermediate,
    )


def distill_two_stage(
    config: FitGateConfig, inputs: FitInputs, fitted: SequenceGateFit
) -> tuple[HiddenStateRouter, dict]:
    """The paper's route: the sequence gate structurally distilled into the head router."""
    inputs.bank.with_hidden = True
    return distill_router(
        inputs.bank,
        fitted.gate,
        router_hidden=config.router_hidden,
        num_samples=config.distill_samples,
        length=config.sample_length,
        sampler=config.sampler,
        oversample=config.sir_oversample,
        steps=config.distill_steps,
        batch_size=config.distill_batch_size,
        learning_rate=config.distill_learning_rate,
        seed=config.seed,
        source=config.distill_source,
        domain_features=list(inputs.fit_features.values()),
        lambdas=fitted.lambda_avg,
        holdout_fraction=config.distill_holdout,
        proposals=inputs.q_pool,
        context_config=router_context_config(config, inputs.bank),
    )


def member_plot_file(name: str) -> str:
    return f"primal_dual_{name}.png"


def fit_candidates(
    config: FitGateConfig, inputs: FitInputs, fitted: SequenceGateFit | None, work_dir: Path
) -> tuple[dict[str, HiddenStateRouter], dict]:
    """Stage 2: every family member by the game (direct route), and the two-stage router.

    Each member's game is plotted to ``primal_dual_<member>.png`` beside stage 1's plot.
    """
    routers, stats = {}, {}
    if config.direct_router and config.family:
        inputs.bank.with_hidden = True
        routers, stats["family"], results = fit_family(
            inputs.data,
            inputs.bank.hidden_sizes,
            router_game_part(config),
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
        routers["two_stage"], stats["distillation"] = distill_two_stage(config, inputs, fitted)
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
    domains = inputs.domains
    served_stats = stats.get("family", {}).get(served, {})
    details = {
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.to_dict().items()},
        "project": str(inputs.project.path),
        # The served router's game (for the two-stage router: the sequence gate's).
        "lambda_avg": served_stats.get("lambda_avg") or (fitted.lambda_avg if fitted else None),
        "data_hash": inputs.data.fingerprint,
        "family": stats.get("family", {}),
        "distillation": stats.get("distillation"),
        "served_router": served,
        "selection": selection,
    }
    if fitted is not None:
        details["sequence_gate"] = {
            "lambda_avg": fitted.lambda_avg, "mu_avg": fitted.mu_avg, "z_avg": fitted.z_avg,
            "domain_excess": dict(zip(domains, fitted.domain_losses_avg)), "gap": fitted.gap,
            "parameters": fitted.gate.num_parameters(),
        }
    if config.evaluate:
        from gatemix.gate.report import evaluate_fit

        if fitted is not None:
            stats = {**stats, "sequence_gate": details["sequence_gate"]}

        details["evaluation"] = evaluate_fit(
            config, inputs, routers, served, fitted.gate if fitted else None, stats, work_dir
        )
    artifact = RouterArtifact(
        router=routers[served],
        expert_names=domains,
        expert_hashes=dict(zip(domains, inputs.bank.hashes)),
        method="robust",
        details=details,
    )
    out_dir = artifact_dir(config, inputs.project)
    saved = save_router(artifact, out_dir)
    (work_dir / "fit_summary.json").write_text(json.dumps(details, indent=2, default=str))
    logger.info("router artifact %s written to %s", saved.version, out_dir)
    return saved


def fit_gate(config: FitGateConfig) -> RouterArtifact | None:
    """Every stage. Under a sharded launch, ranks other than 0 stop after scoring (None)."""
    inputs = fit_inputs(config)
    if inputs is None:
        return None
    work_dir = fit_work_dir(config, inputs.project)
    fitted = fit_sequence_gate(config, inputs, work_dir) if config.two_stage else None
    return _second_stage(config, inputs, fitted, work_dir)


def distill_gate(config: FitGateConfig) -> RouterArtifact | None:
    """Stages 2-4 over a finished stage 1 (``gatemix distill-gate``): the game is not replayed."""
    if not config.two_stage:
        raise FitGateError("distill-gate redoes the two-stage route: it needs two_stage on")
    inputs = fit_inputs(config)
    if inputs is None:
        return None
    work_dir = fit_work_dir(config, inputs.project)
    fitted = load_sequence_gate(config, inputs, work_dir)
    return _second_stage(config, inputs, fitted, work_dir)


def _second_stage(
    config: FitGateConfig, inputs: FitInputs, fitted: SequenceGateFit | None, work_dir: Path
) -> RouterArtifact:
    routers, stats = fit_candidates(config, inputs, fitted, work_dir)
    served, selection = choose_router(config, inputs, routers)
    return write_artifact(config, inputs, fitted, routers, served, selection, stats, work_dir)
