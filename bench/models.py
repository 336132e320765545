"""The folders a bench loads: a project's experts and composite, or K random-init experts.

The models come from the project file (``--project``, default the demo's
folder): its experts in order, its composite (packed by ``ensure_composite``
when missing or stale) unless ``--composite`` names one, and its first expert as
the single-model baseline. ``RandomExpertsConfig`` asks instead for K random-init
experts of one shape, written once by :mod:`gatemix.bench.random_experts` and
packed with a uniform gate.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gatemix.bench.random_experts import (
    ARCHITECTURES,
    ExpertShape,
    cached_random_experts,
    check_architecture,
)
from gatemix.config_cli import field_help
from gatemix.defaults import DEFAULT_PROJECT_DIR
from gatemix.engine import pack
from gatemix.engine.composite_folder import CompositeInfo, PackError
from gatemix.engine.lora_pack import pack_lora_composite
from gatemix.engine.project_composite import composite_is_current, ensure_composite
from gatemix.errors import UserError
from gatemix.expert_folder import read_expert
from gatemix.gate.artifact import RouterArtifact
from gatemix.gate.router import HiddenStateRouter, RouterForm, constant_router
from gatemix.project import Project, ProjectError, load_project

logger = logging.getLogger(__name__)

WEIGHT_DTYPES = ("float32", "bfloat16", "float16")
WORD_VOCAB_SIZE = 32000  # the random experts' word tokenizer, when no tokenizer folder is given


@dataclass(frozen=True)
class BenchModels:
    """The folders one bench run loads."""

    composite_dir: Path
    expert_dirs: list[Path]  # the composite's experts, in its order (naive and lockstep baselines)
    single_dir: Path  # the single-expert baseline
    base_dir: Path | None = None  # the base, when the experts are LoRA adapters of it
    student_dir: Path | None = None
    names: list[str] = field(default_factory=list)

    def describe(self) -> dict:
        return {"composite": str(self.composite_dir), "experts": [str(d) for d in self.expert_dirs],
                "single": str(self.single_dir),
                "student": str(self.student_dir) if self.student_dir else None}


def load_bench_project(path: str) -> Project:
    """The project, without its data (the benches read only models)."""
    try:
        return load_project(path, check_data=False)
    except ProjectError as exc:
        if Path(path) == Path(DEFAULT_PROJECT_DIR) and not Path(path, "gatemix.toml").is_file():
            raise UserError(f"{exc}; build the demo (`gatemix build-demo --out {DEFAULT_PROJECT_DIR}`) "
                            "or pass --project") from exc
        raise


def project_models(project_path: str, *, composite: str | None = None,
                   expert: str | None = None) -> tuple[Project, BenchModels]:
    """The project and its models: its experts, ``composite`` or its own composite, one expert alone."""
    project = load_bench_project(project_path)
    if composite is None:
        info = ensure_composite(project)
    else:
        if not Path(composite).is_dir():
            raise UserError(f"composite folder {composite} not found")
        info = CompositeInfo.read(composite)
        if info.expert_names != project.domains:
            raise UserError(f"{composite} holds experts {info.expert_names}, the project "
                            f"{project.path} names {project.domains}; pass its --project")
    single = Path(expert) if expert else project.tokenizer_dir  # LoRA experts: their base alone
    if not (single / "config.json").is_file():
        raise UserError(f"expert folder {single} not found (no config.json)")
    base = project.tokenizer_dir if project.is_lora else None
    return project, BenchModels(composite_dir=Path(info.path), expert_dirs=list(project.experts.values()),
                                single_dir=single, base_dir=base, names=project.domains)


def check_context(models: BenchModels, tokens: int) -> None:
    """Refuse prompt + output lengths beyond the experts' context (the composite's is the shortest)."""
    config = json.loads((models.composite_dir / "config.json").read_text())
    context = config.get("max_position_embeddings")
    if context and tokens > context:
        raise UserError(f"prompt + output = {tokens} tokens exceed the experts' context of {context}; "
                        "lower the prompt or output length")


@dataclass
class RandomExpertsConfig:
    """K random-init experts of one shape, instead of a project's (``--random-experts 3 ...``)."""

    random_experts: int = field(
        default=0, **field_help("bench this many random-init experts instead of the project's (0: the project's)"))
    random_architecture: str = field(
        default="llama", **field_help(f"their architecture: {', '.join(ARCHITECTURES)}", choices=tuple(ARCHITECTURES)))
    random_hidden_size: int = field(default=512, **field_help("hidden size"))
    random_layers: int = field(default=8, **field_help("decoder layers"))
    random_heads: int = field(default=8, **field_help("attention heads"))
    random_kv_heads: int | None = field(default=None, **field_help("KV heads (None: as many as heads)"))
    random_head_dim: int | None = field(
        default=None, **field_help("size of one head (None: hidden size / heads; the CPU backend needs >= 32)"))
    random_intermediate_size: int = field(default=1536, **field_help("MLP width"))
    random_vocab_size: int | None = field(
        default=None,
        **field_help(f"vocabulary (None: the tokenizer's, or {WORD_VOCAB_SIZE} words without a tokenizer)"))
    random_tokenizer: str | None = field(
        default=None, **field_help("tokenizer folder they share (None: a word-level tokenizer written in code)"))
    random_initializer_range: float = field(default=0.02, **field_help("std of the random weights"))
    random_max_position_embeddings: int = field(default=2048, **field_help("their context length"))
    random_weight_dtype: str = field(
        default="float32", **field_help(f"dtype of the written weights: {', '.join(WEIGHT_DTYPES)}", choices=WEIGHT_DTYPES))
    random_seed: int = field(default=0, **field_help("expert i is drawn with seed + i"))
    random_cache_dir: str = field(
        default=".cache/bench-random-experts",
        **field_help("written under <this>/<hash of the shape>/, reused when present"))

    def __post_init__(self) -> None:
        if self.random_experts < 0:
            raise ValueError(f"random_experts must be >= 0, got {self.random_experts}")
        if self.random_weight_dtype not in WEIGHT_DTYPES:
            raise ValueError(f"random_weight_dtype must be one of {', '.join(WEIGHT_DTYPES)}")
        if self.random_tokenizer is not None and not Path(self.random_tokenizer).is_dir():
            raise ValueError(f"random_tokenizer folder {self.random_tokenizer} not found")
        check_architecture(self.random_architecture, self.shape())

    def shape(self) -> ExpertShape:
        vocab_size = self.random_vocab_size
        if vocab_size is None and self.random_tokenizer is None:
            vocab_size = WORD_VOCAB_SIZE
        return ExpertShape(
            hidden_size=self.random_hidden_size, num_hidden_layers=self.random_layers,
            num_attention_heads=self.random_heads, intermediate_size=self.random_intermediate_size,
            num_key_value_heads=self.random_kv_heads, head_dim=self.random_head_dim,
            vocab_size=vocab_size, initializer_range=self.random_initializer_range,
            max_position_embeddings=self.random_max_position_embeddings,
        )


def random_models(config: RandomExpertsConfig) -> BenchModels:
    """K random experts from the cache (written when missing) and their uniform composite."""
    expert_dirs = cached_random_experts(
        config.random_cache_dir, config.random_experts, config.random_architecture, config.shape(),
        tokenizer_dir=config.random_tokenizer, seed=config.random_seed,
        dtype=getattr(torch, config.random_weight_dtype),
    )
    names = [folder.name for folder in expert_dirs]
    composite = expert_dirs[0].parent / f"composite-k{len(expert_dirs)}"
    experts = [read_expert(folder, name) for folder, name in zip(expert_dirs, names)]
    try:
        current = composite_is_current(CompositeInfo.read(composite), experts, "uniform")
    except (PackError, OSError):
        current = False
    if current:
        logger.info("reusing the random experts' composite %s", composite)
    else:
        pack.pack_composite(expert_dirs, composite, gate="uniform", names=names, overwrite=True)
    return BenchModels(composite_dir=composite, expert_dirs=expert_dirs, single_dir=expert_dirs[0],
                       names=names)


def hidden_router_composite(models: BenchModels) -> Path:
    """The same experts with a random hidden-state router (no posterior), beside the composite.

    Its cost is any hidden-state router's: a small head over the experts' final
    hidden states, no per-request state. Its weights are not fitted.
    """
    return _composite_with_router(models, "-hidden-router", lambda widths: HiddenStateRouter(
        RouterForm.for_experts(widths)))


def uniform_composite(models: BenchModels) -> Path:
    """The same experts under a constant uniform gate, beside the composite: no router, no state.

    What a posterior gate's cost is measured against (``bench engine``), whatever
    gate the project's own composite serves.
    """
    return _composite_with_router(models, "-uniform", lambda widths: constant_router([1.0] * len(widths), widths))


def posterior_composite(models: BenchModels) -> Path:
    """The same experts packed with a posterior gate (uniform prior, zero head), beside the composite.

    Its mixture is the Bayes posterior's, its cost the per-request state's:
    the prefill's extra LM head over every prompt token and the bookkeeping of
    each step (``engine/prefix_state.py``).
    """
    return _composite_with_router(models, "-posterior", _bayes_posterior_router)


def _bayes_posterior_router(widths: list[int]) -> HiddenStateRouter:
    """A posterior router with a uniform prior and a zero head: the Bayes posterior."""
    router = HiddenStateRouter(RouterForm.for_experts(widths, posterior=True))
    with torch.no_grad():
        router.proj_out.weight.zero_()
        router.proj_out.bias.zero_()
    return router


def _composite_with_router(models: BenchModels, suffix: str,
                           make_router: Callable[[list[int]], HiddenStateRouter]) -> Path:
    """The composite's experts packed beside it (``<name><suffix>``) with ``make_router(expert widths)``."""
    info = CompositeInfo.read(models.composite_dir)
    out = models.composite_dir.with_name(models.composite_dir.name + suffix)
    widths = json.loads((models.composite_dir / "config.json").read_text())["gatemix"]["expert_hidden_sizes"]
    torch.manual_seed(0)  # a random router is the same at every run
    router = make_router(widths)
    artifact = RouterArtifact(router, info.expert_names, info.expert_hashes, method=f"bench{suffix}")
    if models.base_dir is not None:  # LoRA experts: the same adapters over their base
        pack_lora_composite(models.base_dir, models.expert_dirs, out, gate=artifact, names=info.expert_names,
                            overwrite=True)
    else:
        pack.pack_composite(models.expert_dirs, out, gate=artifact, names=info.expert_names, overwrite=True)
    return out
