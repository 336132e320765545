"""The GPU check's config (its flags) and the context its sections share.

Split from ``gpu_check.py`` (the sections and the runner) so each reads in one sitting;
``bench/gpu_check.sh`` stages the whole ``bench`` package, so both travel together.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from gatemix.bench.gpu_check_support import FULL_SIZES, TINY_SIZES, CheckSizes, write_random_experts

SECTION_NAMES = ("features", "teacher", "mixing", "router")


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class GpuCheckConfig:
    device: str = field(
        default_factory=_default_device,
        metadata={"help": "the device checked against fp32 on the CPU; cuda if torch sees one"},
    )
    tiny: bool = field(default=False, metadata={"help": "CPU-sized models and shapes (the tests)"})
    out: str | None = field(default=None, metadata={"help": "also write the figures here (JSON)"})
    repeats: int = field(default=20, metadata={"help": "timed calls per figure, median kept"})
    sections: tuple[str, ...] = field(
        default=SECTION_NAMES, metadata={"help": "sections to run", "choices": SECTION_NAMES}
    )
    compile: bool = field(default=True, metadata={"help": "also check torch.compile(mix_logits)"})
    seed: int = field(default=0, metadata={"help": "seed of the random experts and inputs"})

    def __post_init__(self) -> None:
        if self.repeats < 1:
            raise ValueError("repeats must be at least 1")
        unknown = sorted(set(self.sections) - set(SECTION_NAMES))
        if unknown or not self.sections:
            raise ValueError(f"sections must be among {', '.join(SECTION_NAMES)}, got {unknown}")
        try:
            device = torch.device(self.device)
        except RuntimeError as exc:
            raise ValueError(f"device {self.device!r}: {exc}") from exc
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r}, but torch sees no CUDA device")

    @property
    def sizes(self) -> CheckSizes:
        return TINY_SIZES if self.tiny else FULL_SIZES

    @property
    def cpu_repeats(self) -> int:
        """The fp32 CPU side is the reference, not the subject: a few calls time it."""
        return min(self.repeats, 3)


class CheckContext:
    """The config, plus the random experts, written on first use and shared by two sections."""

    def __init__(self, config: GpuCheckConfig, scratch: Path) -> None:
        self.config = config
        self.sizes = config.sizes
        self.device = config.device
        self.scratch = scratch

    @cached_property
    def expert_dirs(self) -> list[Path]:
        experts_root = self.scratch / "experts"
        return write_random_experts(experts_root, self.sizes.experts, seed=self.config.seed)

    def generator(self, device: str = "cpu") -> torch.Generator:
        return torch.Generator(device).manual_seed(self.config.seed)
