"""``gatemix fit-gate``: the robust gate on the demo's real text, end to end.

1. expert features on each domain's ``gate`` split (cached on disk);
2. the sequence-level gate fitted by the primal-dual loop (checkpointed, resumable);
3. structural distillation into the causal ``HiddenStateRouter``;
4. optionally the baselines and the direct-router ablation on the ``eval`` split;
5. the versioned router artifact.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch

from gatemix.errors import UserError
from gatemix.gate.artifact import RouterArtifact, save_router
from gatemix.gate.config import FitGateConfig, PrimalDualConfig
from gatemix.gate.distill_router import TokenFeatures, distill_router, routed_sequence_logprobs
from gatemix.gate.features import HFExpertBank, cached_features, cached_proposals, data_hash
from gatemix.gate.primal_dual import GateFitData, plot_history, run_primal_dual
from gatemix.gate.router import HiddenStateRouter, RouterForm, context_config_like
from gatemix.gate.sequence_gate import SequenceGate, SequenceGateForm

logger = logging.getLogger(__name__)


class FitGateError(UserError):
    """A fit that cannot start: missing demo, experts or splits. One line."""


def expert_names(config: FitGateConfig) -> list[str]:
    if config.experts:
        return list(config.experts)
    experts_dir = Path(config.demo_dir) / "experts"
    if not experts_dir.is_dir():
        raise FitGateError(f"no experts folder at {experts_dir}; build the demo first")
    try:  # the demo's own order, which is also the composite's
        from gatemix.demo.corpus import load_manifest

        names = [name for name in load_manifest(config.demo_dir)["experts"] if (experts_dir / name).is_dir()]
    except Exception:  # not a demo build: every model folder, skipping staging leftovers
        names = sorted(
            path.name for path in experts_dir.iterdir()
            if not path.name.startswith(".") and (path / "config.json").is_file()
        )
    if not names:
        raise FitGateError(f"no expert model folders under {experts_dir}")
    return names


def load_split_features(
    bank: HFExpertBank, config: FitGateConfig, domains: list[str], split: str, with_hidden: bool
) -> dict[str, TokenFeatures]:
    """Domain -> cached expert features of that domain's ``split``."""
    from gatemix.demo.corpus import load_split

    features = {}
    for domain in domains:
        texts = load_split(config.demo_dir, domain, split)
        if config.max_sequences:
            texts = texts[: config.max_sequences]
        if not texts:
            raise FitGateError(f"domain {domain!r} has an empty {split} split")
        features[domain] = cached_features(
            bank,
            texts,
            cache_dir=config.cache_dir,
            max_length=config.max_length,
            with_hidden=with_hidden,
            batch_size=config.feature_batch_size,
            progress=True,
        )
    return features


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


def primal_dual_part(config: FitGateConfig) -> PrimalDualConfig:
    names = {f.name for f in dataclasses.fields(PrimalDualConfig)}
    return PrimalDualConfig(**{k: v for k, v in config.to_dict().items() if k in names})


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


def router_context_config(config: FitGateConfig, bank: HFExpertBank) -> dict | None:
    """The router's own causal Llama, shaped like the experts, or None for a head only."""
    if not config.router_context_layers:
        return None
    return context_config_like(
        bank.models[0].config.to_dict(),
        config.router_context_layers,
        config.router_context_intermediate,
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


def fit_work_dir(config: FitGateConfig) -> Path:
    """Checkpoints, plots and the report: ``work_dir``, else ``<out_dir>/fit``."""
    return Path(config.work_dir or Path(config.out_dir) / "fit")


def fit_gate(config: FitGateConfig) -> RouterArtifact:
    """Fit the robust gate, distill it into the causal router, and save the artifact."""
    if not config.demo_dir:
        raise FitGateError("fit-gate needs demo_dir")
    torch.set_num_threads(config.torch_threads)
    work_dir = fit_work_dir(config)
    domains = expert_names(config)
    bank = HFExpertBank([Path(config.demo_dir) / "experts" / name for name in domains])
    gate_features = load_split_features(bank, config, domains, "gate", with_hidden=True)
    q_pool = cached_proposals(
        bank,
        count=config.q_samples,
        length=config.sample_length,
        seed=config.seed,
        cache_dir=config.cache_dir,
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

    torch.manual_seed(config.seed)
    gate = SequenceGate(
        SequenceGateForm(
            vocab_size=len(bank.tokenizer),
            num_experts=len(domains),
            width=config.gate_width,
            num_layers=config.gate_layers,
            num_heads=config.gate_heads,
            max_length=config.max_length + config.sample_length + 1,
            pooling=config.gate_pooling,
        )
    )
    result = run_primal_dual(
        gate, data, primal_dual_part(config), work_dir=work_dir / "gate", progress=True
    )
    torch.save(gate.state_dict(), work_dir / "sequence_gate.pt")
    plot_history(result.history, work_dir / "primal_dual.png", domains)
    logger.info(
        "lambda_avg %s, Z_avg %.4f, mu_avg %.4f", result.lambda_avg, result.z_avg, result.mu_avg
    )

    bank.with_hidden = True
    two_stage, distill_stats = distill_router(
        bank,
        gate,
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
        domain_features=list(fit_features.values()),
        lambdas=result.lambda_avg,
        holdout_fraction=config.distill_holdout,
        proposals=q_pool,
        context_config=router_context_config(config, bank),
    )
    routers = {"two_stage": two_stage}
    if config.direct_router or config.served_router != "two_stage":
        base = dataclasses.replace(primal_dual_part(config), checkpoint_every=0)
        routers["direct"], direct_stats = fit_router_directly(data, two_stage.form, base)
        logger.info("direct robust router: lambda_avg %s", direct_stats["lambda_avg"])
    served, selection = config.served_router, None
    if served == "best":
        served, selection = select_router(routers, selection_features)
        logger.info("serving the %s router (held-out worst-domain excess %s)", served, selection)
    router = routers[served]
    details = {
        "config": {
            k: (list(v) if isinstance(v, tuple) else v) for k, v in config.to_dict().items()
        },
        "lambda_avg": result.lambda_avg,
        "mu_avg": result.mu_avg,
        "z_avg": result.z_avg,
        "gate_domain_excess": dict(zip(domains, result.domain_losses_avg)),
        "data_hash": fingerprint,
        "distillation": distill_stats,
        "served_router": served,
        "selection": selection,
        "gate_parameters": gate.num_parameters(),
    }
    if config.evaluate:
        from gatemix.gate.report import evaluate_fit

        details["evaluation"] = evaluate_fit(
            config, bank, domains, data, routers, served, gate, work_dir
        )
    artifact = RouterArtifact(
        router=router,
        expert_names=domains,
        expert_hashes=dict(zip(domains, bank.hashes)),
        method="robust",
        details=details,
    )
    saved = save_router(artifact, config.out_dir)
    (work_dir / "fit_summary.json").write_text(json.dumps(details, indent=2, default=str))
    logger.info("router artifact %s written to %s", saved.version, config.out_dir)
    return saved


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
