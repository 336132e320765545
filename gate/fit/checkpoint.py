"""A primal-dual fit's checkpoint: written so an interruption cannot break it, refused when foreign.

Kept apart from the loop (``primal_dual.py``) because what a checkpoint must
match to be resumed (the data's fingerprint and every setting but the
resumable ones) is a contract of its own, and the loop only needs to fill and
read the payload.
"""

from __future__ import annotations

from pathlib import Path

import torch

from gatemix.atomic_write import atomic_file
from gatemix.errors import UserError
from gatemix.gate.fit.config import PrimalDualConfig

CHECKPOINT_FILE = "primal_dual.pt"
# Fields that may change between an interrupted fit and its resumption.
RESUMABLE_FIELDS = ("steps", "checkpoint_every", "torch_threads")


class ResumeError(UserError):
    """A checkpoint that belongs to another fit (other data or other hyperparameters)."""


def comparable_config(config: PrimalDualConfig) -> dict:
    """The settings a checkpoint must share with the fit that resumes it."""
    return {k: v for k, v in config.to_dict().items() if k not in RESUMABLE_FIELDS}


def save_checkpoint(path: Path, payload: dict) -> None:
    # Written beside and renamed, so an interruption mid-write leaves the last good checkpoint.
    with atomic_file(path) as temp:
        torch.save(payload, temp)


def load_checkpoint(path: Path, config: PrimalDualConfig, fingerprint: str) -> dict:
    """The saved payload, refused (``ResumeError``) if it is from other data or settings."""
    saved = torch.load(path, weights_only=False)
    if saved["config"] != comparable_config(config) or saved["fingerprint"] != fingerprint:
        raise ResumeError(
            f"{path} is from a fit with other data or settings; delete it or use another work_dir"
        )
    return saved
