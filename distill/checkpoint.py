"""Checkpoints of a distillation run: everything a resumed run needs to end where an uninterrupted one ends.

A checkpoint is a folder ``<run_dir>/checkpoints/step-NNNNNN`` holding

- ``model.safetensors``: the student's weights;
- ``optimizer.pt``: AdamW's moments and the LR schedule's position;
- ``rng-rank<R>.pt``: each process's generators (the batch sampler's, the
  on-policy sampler's, torch's global CPU and CUDA ones);
- ``trainer_state.json``: the step, the loss curve, the held-out records,
  the best step, and the settings that decide the weights (a run with other
  settings refuses to resume from it).

It is written to a staging folder and renamed, then ``latest`` is pointed at
it, so an interruption at any moment leaves the previous checkpoint whole. The
two newest are kept. Anything unreadable is a ``CheckpointError``: one line
that names the folder and says to delete it or pass ``--no-resume``.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from gatemix.atomic_write import atomic_folder, write_atomically
from gatemix.errors import UserError

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "gatemix-distill-checkpoint/1"
CHECKPOINTS_SUBDIR = "checkpoints"
LATEST_FILE = "latest"
STATE_FILE = "trainer_state.json"
KEEP_CHECKPOINTS = 2


class CheckpointError(UserError):
    """A checkpoint that cannot be resumed from; one line."""


@dataclass
class TrainerState:
    """What the loop carries from step to step, besides the tensors."""

    step: int = 0
    history: list[dict] = field(default_factory=list)  # per step: loss, lr
    evals: list[dict] = field(default_factory=list)  # per held-out evaluation
    best_step: int | None = None
    best_metric: float | None = None
    settings: dict = field(default_factory=dict)
    world_size: int = 1


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS_SUBDIR


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The folder ``latest`` names, None when the run has none; a dangling pointer is an error."""
    pointer = checkpoints_dir(run_dir) / LATEST_FILE
    if not pointer.is_file():
        return None
    path = checkpoints_dir(run_dir) / pointer.read_text().strip()
    if not path.is_dir():
        raise CheckpointError(f"{pointer} names {path.name}, which does not exist (corrupt "
                              "checkpoint); delete the run folder's checkpoints or pass --no-resume")
    return path


def save_checkpoint(run_dir: Path, state: TrainerState, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, schedule, rng_states: list[dict]) -> Path:
    """Write the step's checkpoint atomically (rank 0), point ``latest`` at it, prune old ones."""
    root = checkpoints_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{state.step:06d}"
    final = root / name
    with atomic_folder(final) as staging:
        tensors = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
        save_file(_untie(tensors), str(staging / "model.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "schedule": schedule.state_dict()},
                   staging / "optimizer.pt")
        for rank, rng in enumerate(rng_states):
            torch.save(rng, staging / f"rng-rank{rank}.pt")
        (staging / STATE_FILE).write_text(json.dumps(
            {"format": CHECKPOINT_FORMAT, **asdict(state)}, indent=1))
    write_atomically(root / LATEST_FILE, name + "\n")
    for old in sorted(root.glob("step-*"))[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    logger.info("checkpoint %s", final)
    return final


def _untie(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied embeddings): store copies."""
    seen: set[int] = set()
    out = {}
    for key, tensor in tensors.items():
        pointer = tensor.untyped_storage().data_ptr()
        out[key] = tensor.clone() if pointer in seen else tensor
        seen.add(pointer)
    return out


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    schedule, rank: int) -> tuple[TrainerState, dict]:
    """Restore the tensors in place; return the trainer state and this rank's RNG states."""
    try:
        meta = json.loads((path / STATE_FILE).read_text())
        if meta.pop("format", None) != CHECKPOINT_FORMAT:
            raise ValueError(f"not a {CHECKPOINT_FORMAT} checkpoint")
        state = TrainerState(**meta)
        model.load_state_dict(load_file(str(path / "model.safetensors")), strict=True)
        saved = torch.load(path / "optimizer.pt", weights_only=True)
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
        rng = torch.load(path / f"rng-rank{rank}.pt", weights_only=True)
    except Exception as exc:  # truncated or edited files fail in many ways
        reason = " ".join(str(exc).split())[:200]
        raise CheckpointError(
            f"{path}: corrupt checkpoint ({type(exc).__name__}: {reason}); delete it or pass "
            "--no-resume") from exc
    return state, rng


def check_resumable(path: Path, state: TrainerState, settings: dict, world_size: int) -> None:
    """Refuse a checkpoint of a run with other weight-deciding settings or another process count."""
    changed = sorted(key for key in set(settings) | set(state.settings)
                     if settings.get(key) != state.settings.get(key))
    if changed:
        listed = ", ".join(f"{key} {state.settings.get(key)!r} -> {settings.get(key)!r}"
                           for key in changed[:4])
        raise CheckpointError(f"{path} was written by a run with other settings ({listed}); "
                              "use another --run-dir or pass --no-resume")
    if state.world_size != world_size:
        raise CheckpointError(f"{path} was written by {state.world_size} process(es), this run "
                              f"has {world_size}; resume with the same count or --no-resume")
