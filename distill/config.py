"""Configuration of ``gatemix distill``: the ensemble into one student model."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DistillConfig:
    project: str = field(
        default="", metadata={"help": "the project file (or its folder): experts and each domain's train text"}
    )
    composite_dir: str = field(
        default="",
        metadata={"help": "the teacher composite (default: the project's, packed with its fitted gate)"},
    )
    out_dir: str = field(default="", metadata={"help": "the student folder (default: <project work_dir>/student)"})
    init_from: str = field(default="", metadata={"help": "student initial weights (default: the first expert)"})
    steps: int = field(default=200, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=8, metadata={"help": "sequences per step"})
    seq_len: int = field(default=128, metadata={"help": "tokens per sequence"})
    lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate"})
    beta: float = field(default=0.0, metadata={"help": "generalized JSD: 0 forward KL, 1 reverse KL"})
    seed: int = field(default=0, metadata={"help": "data order and init seed"})
    threads: int = field(default=2, metadata={"help": "torch CPU threads"})
    device: str = field(
        default="auto", metadata={"help": "where teacher and student run: auto (cuda if there is one), cpu, cuda[:N]"}
    )
    teacher_dtype: str = field(
        default="auto", metadata={"help": "the teacher experts' dtype: auto (bf16 on GPU, fp32 on CPU), float32, bfloat16"}
    )

    def __post_init__(self) -> None:
        if not self.project:
            raise ValueError("distill needs a project: --project <gatemix.toml or its folder>")
        if self.steps < 1 or self.batch_size < 1 or self.seq_len < 8:
            raise ValueError("steps >= 1, batch_size >= 1 and seq_len >= 8 required")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError("beta must lie in [0, 1]")
        if self.lr <= 0:
            raise ValueError("lr must be positive")
        if self.threads < 1:
            raise ValueError("threads must be at least 1")
