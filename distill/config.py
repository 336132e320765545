"""Configuration of ``gatemix distill``: the ensemble into one student model."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DistillConfig:
    composite_dir: str = field(metadata={"help": "the teacher: a gatemix composite folder (experts + router)"})
    expert_dirs: list[str] = field(metadata={"help": "the experts' own folders, in the composite's order"})
    text_files: list[str] = field(metadata={"help": "JSONL files of {'text': ...} to distill on"})
    out_dir: str = field(metadata={"help": "where to write the student (a Hugging Face Llama folder)"})
    init_from: str | None = field(default=None, metadata={"help": "student initial weights (default: first expert)"})
    steps: int = field(default=200, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=8, metadata={"help": "sequences per step"})
    seq_len: int = field(default=128, metadata={"help": "tokens per sequence"})
    lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate"})
    beta: float = field(default=0.0, metadata={"help": "generalized JSD: 0 forward KL, 1 reverse KL"})
    seed: int = field(default=0, metadata={"help": "data order and init seed"})
    threads: int = field(default=2, metadata={"help": "torch CPU threads"})

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.seq_len < 8:
            raise ValueError("steps >= 1, batch_size >= 1 and seq_len >= 8 required")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError("beta must lie in [0, 1]")
        if self.lr <= 0:
            raise ValueError("lr must be positive")
        if not self.expert_dirs or not self.text_files:
            raise ValueError("at least one expert folder and one text file are required")
