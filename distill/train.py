"""``gatemix distill``: train one student model on the ensemble's distributions.

The student has an expert's architecture and is initialized from an expert, so
vLLM serves it alone as an ordinary Hugging Face folder, at the cost of one model per
token instead of K. It loses the ensemble's modularity; the benchmark shows what
it buys in speed.
"""

from __future__ import annotations

import logging
import random
import shutil
import tempfile
from pathlib import Path

import torch
from tqdm import tqdm

from gatemix.device import resolve_device, resolve_dtype
from gatemix.distill.config import DistillConfig
from gatemix.distill.loss import generalized_jsd_loss
from gatemix.distill.teacher import EnsembleTeacher
from gatemix.errors import UserError
from gatemix.project import Project, load_project

logger = logging.getLogger(__name__)


def _token_stream(config: DistillConfig, project: Project, texts: list[str], tokenizer) -> list[int]:
    """The documents, joined by EOS."""
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False).input_ids
        ids.append(tokenizer.eos_token_id)
    if len(ids) < config.seq_len + 1:
        raise UserError(
            f"{project.path}: the train splits hold {len(ids)} tokens, fewer than one sequence of {config.seq_len}"
        )
    return ids


def _batches(ids: list[int], config: DistillConfig, rng: random.Random):
    starts = range(0, len(ids) - config.seq_len, config.seq_len)
    while True:
        chosen = rng.sample(list(starts), min(config.batch_size, len(starts)))
        yield torch.tensor([ids[s : s + config.seq_len] for s in chosen])


def distill(config: DistillConfig) -> Path:
    """Train the student and write it atomically to its folder; returns that path."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gatemix.engine.composite_folder import ensure_composite

    torch.manual_seed(config.seed)
    torch.set_num_threads(config.threads)
    project = load_project(config.project)
    expert_dirs = list(project.experts.values())
    # Every domain's train split, read and checked before any work is done.
    texts = [text for domain in project.domains for text in project.texts(domain, "train")]
    tokenizer = AutoTokenizer.from_pretrained(expert_dirs[0])
    token_ids = _token_stream(config, project, texts, tokenizer)
    composite = Path(config.composite_dir) if config.composite_dir else ensure_composite(project).path
    device = resolve_device(config.device)
    teacher = EnsembleTeacher.load(
        composite, expert_dirs, device=device, dtype=resolve_dtype(config.teacher_dtype, device)
    )
    student = AutoModelForCausalLM.from_pretrained(
        config.init_from or expert_dirs[0], dtype=torch.float32
    ).to(device)
    student.train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=config.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / config.steps)
    batches = _batches(token_ids, config, random.Random(config.seed))
    progress = tqdm(range(config.steps), desc="distill", unit="step")
    for _ in progress:
        input_ids = next(batches).to(device)
        teacher_logprobs, _ = teacher(input_ids)
        loss = generalized_jsd_loss(student(input_ids=input_ids).logits, teacher_logprobs, beta=config.beta)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        progress.set_postfix(kl=f"{loss.item():.4f}")
    return _save(student.cpu(), tokenizer, expert_dirs[0], Path(config.out_dir or project.student_dir))


def _save(student, tokenizer, first_expert: Path, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    student.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    for name in ("generation_config.json",):
        source = Path(first_expert) / name
        if source.is_file():
            shutil.copy2(source, staging / name)
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    logger.info("student written to %s", out)
    return out
