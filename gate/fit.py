"""``gatemix fit-gate``: the robust gate on a project's experts and data, in named stages.

0. ``fit_inputs``: the experts' features on each domain's gate (and eval) text,
   cached on disk and sharded across processes under ``torchrun``; the pool of
   draws from ``q``; the held-out selection share.
1. ``fit_sequence_gate``: the sequence-level gate, fitted by the primal-dual
   game against the worst mixture of domains (checkpointed, resumable). Its
   end state is saved (``sequence_gate.pt``, ``game.json``), so
   ``load_sequence_gate`` can hand it to the next stage without replaying it.
2. ``distill_routers``: structural distillation into the causal
   ``HiddenStateRouter`` (and the direct robust router, the paper's ablation).
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
from gatemix.gate.distill_router import TokenFeatures, distill_router, routed_sequence_logprobs
from gatemix.gate.features import HFExpertBank, Shard, cached_features, cached_proposals, data_hash
from gatemix.gate.primal_dual import GateFitData, plot_history, run_primal_dual
from gatemix.gate.router import HiddenStateRouter, RouterForm, context_config_like
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
    q_pool: TokenFeatures
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
            progress=True,
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
            raise FitGateError(f"domain {domain!r} has {count} gate sequence(s); selection needs 2")
        order = torch.randperm(count, generator=generator)
        held = min(count - 1, max(1, round(fraction * count)))
        selection_part[domain] = part.select(order[:held])
        fit_part[domain] = part.select(order[held:])
    return fit_part, selection_part


def load_bank(config: FitGateConfig, project: Project, shard: Shard) -> HFExpertBank:
    """The experts in transformers, on this process's device (``cuda:<local rank>`` when sharded)."""
    device = resolve_device(config.device)
    if device == "cuda" and shard.world_size > 1:
        import os

        device = f"cuda:{int(os.environ.get('LOCAL_RANK', shard.rank)) % torch.cuda.device_count()}"
    dtype = resolve_dtype(config.dtype, device)
    logger.info("experts score on %s in %s", device, dtype)
    return HFExpertBank(list(project.experts.values()), device=device, dtype=dtype)


def fit_inputs(config: FitGateConfig, shard: Shard | None = None) -> FitInputs | None:
    """Stage 0. Under a sharded launch every process scores its part; only rank 0 gets inputs."""
    shard = shard or Shard.from_env()
    project = load_project(config.project) if config.project else None
    if project is None:
        raise FitGateError("fit-gate needs a project: --project <gatemix.toml or its folder>")
    for domain in project.domains:  # every source read and checked before any work is done
        for split in ("gate", "eval") if config.evaluate else ("gate",):
            project_texts(project, domain, split, config)
    torch.set_num_threads(config.torch_threads)
    bank = load_bank(config, project, shard)
    gate_features = load_split_features(bank, config, project, "gate", shard)
    if config.evaluate:  # scored now, so the eval split shards too
        load_split_features(bank, config, project, "eval", shard)
    if not shard.is_main:
        return None
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
        + [str(q_pool.input_ids.tolist())]
    )
    data = fit_data(fit_features, fingerprint, proposal=q_pool)
    project.write_split_record(fit_work_dir(config, project) / "splits.json")
    return FitInputs(project, bank, fit_features, selection_features, q_pool, data)


def primal_dual_part(config: FitGateConfig) -> PrimalDualConfig:
    names = {f.name for f in dataclasses.fields(PrimalDualConfig)}
    return PrimalDualConfig(**{k: v for k, v in config.to_dict().items() if k in names})


def fit_sequence_gate(config: FitGateConfig, inputs: FitInputs, work_dir: Path) -> SequenceGateFit:
    """Stage 1: the primal-dual game; its end state is saved for ``load_sequence_gate``."""
    torch.manual_seed(config.seed)
    gate = SequenceGate(sequence_gate_form(config, inputs))
    result = run_primal_dual(
        gate, inputs.data, primal_dual_part(config), work_dir=work_dir / "gate", progress=True
    )
    plot_history(result.history, work_dir / "primal_dual.png", inputs.domains)
    logger.info("lambda_avg %s, Z_avg %.4f, mu_avg %.4f", result.lambda_avg, result.z_avg, result.mu_avg)
    fitted = SequenceGateFit(
        gate, result.lambda_avg, result.mu_avg, result.z_avg, result.domain_losses_avg
    )
    torch.save(gate.state_dict(), work_dir / SEQUENCE_GATE_FILE)
    game = {name: getattr(fitted, name) for name in ("lambda_avg", "mu_avg", "z_avg", "domain_losses_avg")}
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
    return SequenceGateFit(gate, game["lambda_avg"], game["mu_avg"], game["z_avg"], game["domain_losses_avg"])


def router_context_config(config: FitGateConfig, bank: HFExpertBank) -> dict | None:
    """The router's own causal Llama, shaped like the first expert, or None for a head only."""
    if not config.router_context_layers:
        return None
    return context_config_like(
        bank.models[0].config.to_dict(),
        config.router_context_layers,
        config.router_context_intermediate,
    )


def fit_router_directly(
    data: GateFitData, form: RouterForm, config: PrimalDualConfig, work_dir: Path | None = None
) -> tuple[HiddenStateRouter, dict]:
    """The causal router trained by the primal-dual loop itself (ERM when lambda is fixed)."""
    torch.manual_seed(config.seed)
    router = HiddenStateRouter(form).set_constant(torch.ones(form.num_experts))
    result = run_primal_dual(
        router,
        data,
        config,
        sequence_logprob_fn=routed_sequence_logprobs,
        normalized=True,
        work_dir=work_dir,
    )
    return router, {"lambda_avg": result.lambda_avg, "domain_losses_avg": result.domain_losses_avg}


def distill_routers(
    config: FitGateConfig, inputs: FitInputs, fitted: SequenceGateFit
) -> tuple[dict[str, HiddenStateRouter], dict]:
    """Stage 2: the two-stage router (and the direct one when it may be served or is asked for)."""
    inputs.bank.with_hidden = True
    two_stage, stats = distill_router(
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
    routers = {"two_stage": two_stage}
    if config.direct_router or config.served_router != "two_stage":
        base = dataclasses.replace(primal_dual_part(config), checkpoint_every=0)
        routers["direct"], direct_stats = fit_router_directly(inputs.data, two_stage.form, base)
        logger.info("direct robust router: lambda_avg %s", direct_stats["lambda_avg"])
    return routers, stats


def select_router(
    candidates: dict[str, HiddenStateRouter], selection: dict[str, TokenFeatures]
) -> tuple[str, dict]:
    """The candidate with the lowest worst-domain excess on the held-out sequences (ties: first)."""
    from gatemix.gate.evaluate import evaluate_methods
    from gatemix.gate.registry import GATES

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


def choose_router(
    config: FitGateConfig, inputs: FitInputs, routers: dict[str, HiddenStateRouter]
) -> tuple[str, dict | None]:
    """Stage 3: the router to serve, and the held-out figures that chose it."""
    if config.served_router != "best":
        return config.served_router, None
    served, selection = select_router(routers, inputs.selection_features)
    logger.info("serving the %s router (held-out worst-domain excess %s)", served, selection)
    return served, selection


def write_artifact(
    config: FitGateConfig,
    inputs: FitInputs,
    fitted: SequenceGateFit,
    routers: dict[str, HiddenStateRouter],
    served: str,
    selection: dict | None,
    distill_stats: dict,
    work_dir: Path,
) -> RouterArtifact:
    """Stage 4: evaluate (optionally) and write the router artifact for ``gatemix pack``."""
    domains = inputs.domains
    details = {
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.to_dict().items()},
        "project": str(inputs.project.path),
        "lambda_avg": fitted.lambda_avg,
        "mu_avg": fitted.mu_avg,
        "z_avg": fitted.z_avg,
        "gate_domain_excess": dict(zip(domains, fitted.domain_losses_avg)),
        "data_hash": inputs.data.fingerprint,
        "distillation": distill_stats,
        "served_router": served,
        "selection": selection,
        "gate_parameters": fitted.gate.num_parameters(),
    }
    if config.evaluate:
        from gatemix.gate.report import evaluate_fit

        details["evaluation"] = evaluate_fit(config, inputs, routers, served, fitted.gate, work_dir)
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
    fitted = fit_sequence_gate(config, inputs, work_dir)
    return _second_stage(config, inputs, fitted, work_dir)


def distill_gate(config: FitGateConfig) -> RouterArtifact | None:
    """Stages 2-4 over a finished stage 1 (``gatemix distill-gate``): the game is not replayed."""
    inputs = fit_inputs(config)
    if inputs is None:
        return None
    work_dir = fit_work_dir(config, inputs.project)
    fitted = load_sequence_gate(config, inputs, work_dir)
    return _second_stage(config, inputs, fitted, work_dir)


def _second_stage(
    config: FitGateConfig, inputs: FitInputs, fitted: SequenceGateFit, work_dir: Path
) -> RouterArtifact:
    routers, stats = distill_routers(config, inputs, fitted)
    served, selection = choose_router(config, inputs, routers)
    return write_artifact(config, inputs, fitted, routers, served, selection, stats, work_dir)


def proportions(data: GateFitData) -> tuple[float, ...]:
    """Token proportions of the domains in the fit data (ERM's lambda)."""
    tokens = torch.zeros(data.num_domains, dtype=torch.float64).index_add(
        0, data.tensors["domain"], data.tensors["num_tokens"].double()
    )
    weights = tokens / tokens.sum()
    return tuple(float(w) for w in weights[:-1]) + (1.0 - float(weights[:-1].sum()),)


def in_domain_cross_entropy(features: dict[str, TokenFeatures]) -> list[float]:
    """Each expert's cross-entropy on its own domain: ``eps_k`` up to a shared constant."""
    values = []
    for index, part in enumerate(features.values()):
        values.append(
            float(-(part.next_logprobs[..., index] * part.token_mask).sum() / part.token_mask.sum())
        )
    return values
