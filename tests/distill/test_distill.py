"""Distillation moves a student toward the ensemble's exact mixture."""

from __future__ import annotations

import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from gatemix.demo.corpus import load_split
from gatemix.distill.config import DistillConfig
from gatemix.distill.loss import generalized_jsd_loss
from gatemix.distill.teacher import EnsembleTeacher
from gatemix.distill.train import distill


def _heldout_kl(student_dir, teacher, input_ids) -> float:
    student = LlamaForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        teacher_logprobs, _ = teacher(input_ids)
        return generalized_jsd_loss(student(input_ids=input_ids).logits, teacher_logprobs).item()


def test_distilled_student_is_closer_to_the_ensemble_than_its_init(demo_paths, composite_dir, tmp_path):
    expert_dirs = [str(p) for p in demo_paths.expert_dirs.values()]
    config = DistillConfig(
        project=str(demo_paths.project_file),
        composite_dir=str(composite_dir),
        out_dir=str(tmp_path / "student"),
        steps=30,
        batch_size=4,
        seq_len=64,
        lr=2e-3,
    )
    student_dir = distill(config)
    teacher = EnsembleTeacher.load(composite_dir, expert_dirs)
    tokenizer = AutoTokenizer.from_pretrained(expert_dirs[0])
    heldout = []
    for domain in demo_paths.expert_dirs:
        ids = tokenizer(" ".join(load_split(demo_paths.root, domain, "eval")), add_special_tokens=False).input_ids
        heldout.append(ids[:64])
    input_ids = torch.tensor(heldout)
    before = _heldout_kl(expert_dirs[0], teacher, input_ids)
    after = _heldout_kl(student_dir, teacher, input_ids)
    assert after < 0.9 * before, (before, after)
    assert (student_dir / "config.json").is_file() and (student_dir / "tokenizer.json").is_file()
