"""``gatemix fit-gate``: the robust gate on a project's experts and data, in named stages.

0. ``fit_inputs``: the experts' features on each domain's gate (and eval) text,
   cached on disk and sharded across processes under ``torchrun``; the pool of
   draws from ``q`` (two-stage route only); the held-out selection share.
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

from gatemix.device import resolve_device, resolve_dtype
from gatemix.errors import UserError
from gatemix.gate.artifact import RouterArtifact, save_router
from gatemix.gate.config import FitGateConfig, PrimalDualConfig
from gatemix.gate.distill_router import TokenFeatures, distill_router
from gatemix.gate.family import fit_family
from gatemix.gate.features import HFExpertBank, Shard, cached_features, cached_proposals, data_hash
from gatemix.gate.primal_dual import GateFitData, plot_history, run_primal_dual
from gatemix.gate.registry import GATE_FAMILY
from gatemix.gate.router import HiddenStateRouter, context_config_like
from gatemix.gate.selection import select_router, split_for_selection
from gatemix.gate.sequence_gate import SequenceGate, SequenceGateForm
from gatemix.project import Project, load_project

logger = logging.getLogger(__name__)

SEQUENCE_GATE_FILE = "sequence_gate.pt"
GAME_FILE = "game.json"  # the game's averaged end state, what stage 2 reads


class FitGateError(UserError):
    """A fit that cannot start: no project, an empty split, no finished stage 1. One line."""


@dataclass
class FitInputs:
    """What every stage reads: the project, the loaded experts and their features."""

    project: Project
    bank: HFExpertBank
    fit_features: dict[str, TokenFeatures]  # domain -> gate-split features, selection share removed
    selection_features: dict[str, TokenFeatures] | None
    q_pool: TokenFeatures | None  # draws from q, for the two-stage route's Z and SIR
    data: GateFitData

    @property
    def domains(self) -> list[str]:
        return self.project.domains


@dataclass
class SequenceGateFit:
    """Stage 1's result: the fitted sequence gate and the game's averaged iterates."""

    gate: SequenceGate
    lambda_avg: list[float]
    mu_avg: float
    z_avg: float
    domain_losses_avg: list[float]
    gap: dict | None = None  # the final duality-gap check of the averaged iterates


def fit_work_dir(config: FitGateConfig, project: Project) -> Path:
    """Checkpoints, plots and the report: ``work_dir``, else ``<out_dir>/fit``."""
    return Path(config.work_dir or Path(artifact_dir(config, project)) / "fit")


def artifact_dir(config: FitGateConfig, project: Project) -> Path:
    return Path(config.out_dir) if config.out_dir else project.gate_dir


def features_cache_dir(config: FitGateConfig, project: Project) -> Path:
    return Path(config.cache_dir) if config.cache_dir else project.cache_dir / "gate-features"


def project_texts(project: Project, domain: str, split: str, config: FitGateConfig) -> list[str]:
    texts = project.texts(domain, split)
    return texts[: config.max_sequences] if config.max_sequences else texts


def load_split_features(
    bank: HFExpertBank, config: FitGateConfig, project: Project, split: str, shard: Shard | None = None
) -> dict[str, TokenFeatures]:
    """Domain -> cached expert features (with hidden states) of that domain's ``split``."""
    return {
        domain: cached_features(
            bank,
            project_texts(project, domain, split, config),
            cache_dir=features_cache_dir(config, project),
            max_length=config.max_length,
            with_hidden=True,
            batch_size=config.feature_batch_size,
            shard=shard,
            progress=config.progress,
        )
        for domain in project.domains
    }


def fit_data(
    features: dict[str, TokenFeatures],
    fingerprint: str = "",
    proposal: TokenFeatures | None = None,
) -> GateFitData:
    """Per-domain features (and draws from q for Z) -> the loop's tensors (domain j is expert j's)."""
    merged = TokenFeatures.concat(list(features.values()))
    domain = torch.cat(
        [torch.full((f.input_ids.shape[0],), j) for j, f in enumerate(features.values())]
    )
    tensors = {
        "domain": domain,
        "num_tokens": merged.num_tokens(),
        "expert_sequence_logprobs": merged.sequence_logprobs(),
        "input_ids": merged.input_ids,
        "attention_mask": merged.attention_mask,
    }
    if merged.hidden is not None:
        tensors.update(
            hidden=merged.hidden, next_logprobs=merged.next_logprobs, token_mask=merged.token_mask
        )
    proposal_tensors = None
    if proposal is not None:
        proposal_tensors = {
            "expert_sequence_logprobs": proposal.sequence_logprobs(),
            "input_ids": proposal.input_ids,
            "attention_mask": proposal.attention_mask,
        }
    return GateFitData(
        tensors, num_domains=len(features), fingerprint=fingerprint, proposal=proposal_tensors
    )


def load_bank(config: FitGateConfig, project: Project, shard: Shard) -> HFExpertBank:
    """The experts in transformers, on this process's device (``cuda:<local rank>`` when sharded)."""
    device = resolve_device(config.device)
    if device == "cuda" and shard.world_size > 1:
        import os

        device = f"cuda:{int(os.environ.get('LOCAL_RANK', shard.rank)) % torch.cuda.device_count()}"
    dtype = resolve_dtype(config.dtype, device)
    logger.info("experts score on %s in %s", device, dtype)
    return HFExpertBank(list(project.experts.values()), device=device, dtype=dtype)


def check_names(config: FitGateConfig) -> None:
    """Refuse unknown family members or a served router that no fit makes, before any work."""
    unknown = [name for name in config.family if name not in GATE_FAMILY]
    if unknown:
        raise FitGateError(f"unknown gate family member(s) {unknown}; known: {list(GATE_FAMILY)}")
    if served_name(config) not in ("best", *candidate_names(config)):
        raise FitGateError(
            f"served_router {config.served_router!r} is not fitted; candidates: {candidate_names(config)}"
        )


def candidate_names(config: FitGateConfig) -> list[str]:
    """The routers this fit makes, in order: the family members, then the two-stage router."""
    names = list(config.family) if config.direct_router else []
    return names + (["two_stage"] if config.two_stage else [])


def served_name(config: FitGateConfig) -> str:
    """``served_router`` with the old name of the direct head router mapped to its member."""
    return "hidden_state_router" if config.served_router == "direct" else config.served_router


def fit_inputs(config: FitGateConfig, shard: Shard | None = None) -> FitInputs | None:
    """Stage 0. Under a sharded launch every process scores its part; only rank 0 gets inputs."""
    shard = shard or Shard.from_env()
    project = load_project(config.project) if config.project else None
    if project is None:
        raise FitGateError("fit-gate needs a project: --project <gatemix.toml or its folder>")
    check_names(config)
    for domain in project.domains:  # every source read and checked before any work is done
        for split in ("gate", "eval") if config.evaluate else ("gate",):
            project_texts(project, domain, split, config)
    if config.evaluate and project.out_of_domain is not None:
        project.out_of_domain_texts()
    torch.set_num_threads(config.torch_threads)
    bank = load_bank(config, project, shard)
    gate_features = load_split_features(bank, config, project, "gate", shard)
    if config.evaluate:  # scored now, so the eval split shards too
        load_split_features(bank, config, project, "eval", shard)
    if not shard.is_main:
        return None
    q_pool = None
    if config.two_stage:
        q_pool = cached_proposals(
            bank,
            count=config.q_samples,
            length=config.sample_length,
            seed=config.seed,
            cache_dir=features_cache_dir(config, project),
        )
    fit_features, selection_features = split_for_selection(
        gate_features, config.selection_fraction, config.seed
    )
    fingerprint = data_hash(
        bank.hashes
        + [str(f.input_ids.tolist()) for f in fit_features.values()]
        + ([str(q_pool.input_ids.tolist())] if q_pool is not None else [])
    )
    data = fit_data(fit_features, fingerprint, proposal=q_pool)
    project.write_split_record(fit_work_dir(config, project) / "splits.json")
    return FitInputs(project, bank, fit_features, selection_features, q_pool, data)


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
