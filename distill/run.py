"""Stage 1 of ``gatemix distill``: everything a run reads, checked and loaded once.

``prepare_run`` reads the project, checks the student's init (its tokenizer
and that vLLM serves its architecture) before anything heavy loads, cuts each
domain's text into windows, takes the domain weights (uniform, the served
gate's lambda or the data's shares), loads the teacher with its on-disk
target cache, and builds the student, its optimizer and its LR schedule.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer

from gatemix.device import resolve_dtype
from gatemix.distill.config import DistillConfig
from gatemix.distill.data import (
    BatchSampler,
    WindowSet,
    domain_weights,
    eval_windows,
    train_windows,
)
from gatemix.distill.distributed import Distributed
from gatemix.distill.loss import DIVERGENCE_BETA
from gatemix.distill.student import (
    StudentError,
    build_student,
    check_servable,
    check_tokenizer,
    init_folder,
    student_config,
)
from gatemix.distill.teacher import EnsembleTeacher
from gatemix.distill.teacher_cache import TeacherCache, TeacherTargetSource, cache_key
from gatemix.engine.composite_folder import GATE_SUBDIR, CompositeInfo
from gatemix.engine.project_composite import ensure_composite
from gatemix.gate.artifact import load_router
from gatemix.project import Project, load_project

logger = logging.getLogger(__name__)

BEST_SUBDIR = "best"


@dataclass
class DistillRun:
    """Everything the loop reads, built once by ``prepare_run``."""

    config: DistillConfig
    dist: Distributed
    device: str
    project: Project
    out_dir: Path
    run_dir: Path
    train: WindowSet
    heldout: WindowSet | None
    sampler: BatchSampler
    train_targets: TeacherTargetSource | None
    eval_targets: TeacherTargetSource | None
    model: torch.nn.Module  # DDP-wrapped under a launcher
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LambdaLR
    policy_generator: torch.Generator
    record: dict  # what the run is, for the student's distill.json and the report

    @property
    def beta(self) -> float:
        return DIVERGENCE_BETA.get(self.config.loss, self.config.beta)

    @property
    def divergence_kind(self) -> str:
        """``loss.DIVERGENCE_KINDS``: total variation for ``--loss tv``, else the JSD family."""
        return "tv" if self.config.loss == "tv" else "jsd"


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Multiplier of the peak LR after ``step`` updates: linear warmup, then cosine to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def served_gate_lambda(composite: Path) -> tuple[dict[str, float] | None, dict]:
    """The served gate's fitted lambda by expert name (None if it has none) and its description."""
    artifact = load_router(composite / GATE_SUBDIR)
    values = artifact.details.get("lambda_avg")
    gate_lambda = dict(zip(artifact.expert_names, values)) if values else None
    return gate_lambda, {"version": artifact.version, "method": artifact.method}


def _composite(config: DistillConfig, project: Project, dist: Distributed) -> Path:
    """The teacher composite; the project's is packed (rank 0) when missing or stale."""
    if config.composite_dir:
        path = Path(config.composite_dir)
    else:
        if dist.is_main:
            ensure_composite(project)
        dist.barrier()
        path = project.composite_dir
    info = CompositeInfo.read(path)
    if info.expert_names != project.domains:
        raise StudentError(f"composite {path} holds experts {info.expert_names}, the project "
                           f"{project.domains}: pass the project's own composite")
    return path


def _target_sources(config: DistillConfig, cache_root: Path, teacher: EnsembleTeacher,
                    teacher_dtype: torch.dtype, composite: Path, project: Project,
                    windows: list[WindowSet | None], vocab_size: int, dist: Distributed) -> list:
    """One ``TeacherTargetSource`` per window set (None where the set is None), cached on disk."""
    info = CompositeInfo.read(composite)
    sources = []
    for window_set in windows:
        if window_set is None:
            sources.append(None)
            continue
        cache = None
        if config.teacher_cache:
            key = cache_key(expert_hashes=[info.expert_hashes[d] for d in project.domains],
                            gate_version=info.gate_version, dtype=str(teacher_dtype),
                            top_k=config.teacher_top_k, vocab_size=vocab_size, windows=window_set)
            folder = cache_root / key
            if dist.is_local_main:
                TeacherCache.create(folder, num_windows=len(window_set),
                                    seq_len=window_set.seq_len, vocab_size=vocab_size,
                                    top_k=config.teacher_top_k)
            dist.barrier()
            cache = TeacherCache.open(folder)
        sources.append(TeacherTargetSource(teacher, config.teacher_top_k, cache))
    return sources


def _checked_init(config: DistillConfig, project: Project, vocab_size: int) -> tuple[Path, dict]:
    """The student's init folder and config, refused early for another tokenizer or an
    architecture vLLM cannot serve (before the teacher or any weights load)."""
    folder = init_folder(config.init, config.init_from, project)
    model_config = student_config(config.init, folder, config.student_config)
    check_tokenizer(folder, model_config, project.tokenizer_dir, vocab_size)
    check_servable(str((model_config.get("architectures") or ["?"])[0]), f"student from {folder}")
    return folder, model_config


def _optimizer(config: DistillConfig, model: torch.nn.Module):
    """AdamW and its LR schedule (``lr_factor``: linear warm-up, then cosine to ``min_lr_ratio``)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(0.9, 0.95),
                                  weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(
        step, config.steps, config.warmup_steps, config.min_lr_ratio))
    return optimizer, schedule


def prepare_run(config: DistillConfig, dist: Distributed, device: str) -> DistillRun:
    """Stage 1: read and check everything, load the teacher and the student."""
    torch.set_num_threads(config.threads)
    project = load_project(config.project)
    for domain in project.domains:  # every train source read and checked before any model loads
        project.texts(domain, "train")
    vocab_size = project.expert_folders()[0].config["vocab_size"]
    folder, model_config = _checked_init(config, project, vocab_size)
    tokenizer = AutoTokenizer.from_pretrained(project.tokenizer_dir)
    train = train_windows(project, tokenizer, config.seq_len)
    heldout = eval_windows(project, tokenizer, config.seq_len, config.eval_tokens) \
        if config.eval_every else None
    if heldout is not None and not heldout.domains:
        heldout = None
    composite = _composite(config, project, dist)
    gate_lambda, gate = served_gate_lambda(composite)
    weights = domain_weights(config.domain_weights, train, gate_lambda, str(project.path),
                             config.uniform_mix)
    teacher_dtype = resolve_dtype(config.teacher_dtype, device)
    train_targets = eval_targets = None
    if config.uses_teacher:
        teacher = EnsembleTeacher.load(composite, project.expert_folders(), device=device,
                                       dtype=teacher_dtype)
        cache_root = Path(config.cache_dir) if config.cache_dir else \
            project.cache_dir / "distill-teacher"
        train_targets, eval_targets = _target_sources(
            config, cache_root, teacher, teacher_dtype, composite, project, [train, heldout],
            vocab_size, dist)
    model = build_student(config.init, folder, model_config, config.seed).to(device)
    model.train()
    optimizer, schedule = _optimizer(config, model)
    out_dir = Path(config.out_dir) if config.out_dir else project.student_dir
    record = {
        "project": str(project.path),
        "config": dataclasses.asdict(config),
        "teacher": {"composite": str(composite), "gate": gate, "dtype": str(teacher_dtype),
                    "top_k": config.teacher_top_k if 0 < config.teacher_top_k < vocab_size else 0,
                    "vocab_size": vocab_size, "used": config.uses_teacher},
        "domain_weights": {"kind": config.domain_weights, "uniform_mix": config.uniform_mix,
                           "weights": dict(zip(train.domains, weights)),
                           "gate_lambda": gate_lambda},
        "student": {"init": config.init, "from": str(folder), "architecture":
                    type(model).__name__, "parameters": sum(p.numel() for p in model.parameters())},
        "train_windows": dict(zip(train.domains, train.counts)),
        "world_size": dist.world_size,
    }
    return DistillRun(
        config=config, dist=dist, device=device, project=project, out_dir=out_dir,
        run_dir=Path(config.run_dir) if config.run_dir else out_dir.with_name(out_dir.name + ".run"),
        train=train, heldout=heldout,
        sampler=BatchSampler(train, weights, config.seed),
        train_targets=train_targets, eval_targets=eval_targets,
        model=dist.wrap(model, device), optimizer=optimizer, schedule=schedule,
        policy_generator=torch.Generator().manual_seed(config.seed + 1 + dist.rank),
        record=record,
    )
