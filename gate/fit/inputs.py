"""Stage 0 of ``gatemix fit-gate``: what every later stage reads, and where the fit writes.

The project and its checks, the experts loaded on this process's device, their
features on each domain's gate (and eval) text (cached on disk and sharded
across processes under ``torchrun``), the pool of draws from ``q`` (two-stage
route only) and the held-out selection share. Kept apart from the stages that
fit (``pipeline.py``) because the report reads the same inputs again, and because
everything here is checked before any fitting starts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from gatemix.device import resolve_device, resolve_dtype
from gatemix.errors import UserError
from gatemix.gate.fit.config import FitGateConfig
from gatemix.gate.fit.expert_bank import HFExpertBank
from gatemix.gate.fit.features import (
    Shard,
    cached_features,
    cached_proposals,
    data_hash,
)
from gatemix.gate.fit.game_data import GateFitData
from gatemix.gate.fit.selection import split_for_selection
from gatemix.gate.registry import GATE_FAMILY
from gatemix.gate.router import context_config_like
from gatemix.gate.token_features import TokenFeatures
from gatemix.process_rank import ProcessRank
from gatemix.project import Project, load_project

logger = logging.getLogger(__name__)


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
        device = f"cuda:{ProcessRank.from_env().local_rank % torch.cuda.device_count()}"
    dtype = resolve_dtype(config.dtype, device)
    logger.info("experts score on %s in %s", device, dtype)
    return HFExpertBank(project.expert_folders(), device=device, dtype=dtype)


def router_context_config(config: FitGateConfig, bank: HFExpertBank) -> dict | None:
    """The router's own causal Llama, shaped like the first expert, or None for a head only."""
    if not config.router_context_layers:
        return None
    return context_config_like(
        bank.models[0].config.to_dict(),
        config.router_context_layers,
        config.router_context_intermediate,
    )


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
