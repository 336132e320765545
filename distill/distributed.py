"""Running one distillation over several processes: plain torch DDP, launched by ``torchrun``.

Why DDP under ``torchrun`` rather than TRL's ``GKDTrainer`` or ``accelerate``:

- The teacher is not one Hugging Face model. GKD's trainer takes a
  ``teacher_model`` and calls its forward inside ``compute_loss``; ours is K
  experts plus a router (``EnsembleTeacher``), scored once per window into a
  cache, with top-k targets and a tail bucket, batches drawn by the gate's
  lambda, and held-out figures the trainer does not know. Fitting that into
  GKD means overriding most of it, and TRL is one more pinned dependency.
- ``accelerate`` would add a launcher and a config file for what, here, is
  three calls (``init_process_group``, ``DistributedDataParallel``,
  ``all_reduce``); ``torchrun`` ships with torch, reads the same rendezvous
  flags on one node or many (``--nnodes``, ``--rdzv-endpoint``), and the same
  code runs on CPUs with gloo, which is how the 2-process test runs.
- DDP replicates the student, which is what a student is for: it is meant to
  be served on one GPU, so it fits on one for training. (A student too big
  for one GPU would want FSDP; that is not done here.)

Every process draws the same global batch from the same seeded sampler and
trains on its rows ``rank::world_size``; DDP averages the gradients, so the
update is the single-process one on the whole batch (equal token counts per
process), up to the order of floating-point sums. Rank 0 writes checkpoints,
the best student and the output; every rank writes its own RNG state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from gatemix.device import resolve_device
from gatemix.process_rank import ProcessRank


@dataclass(frozen=True)
class Distributed(ProcessRank):
    """This process's rank (``ProcessRank.from_env()``) and the collective calls over the ranks."""

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def device(self, requested: str) -> str:
        """This process's device: under a launcher, ``auto``/``cuda`` is its own GPU."""
        device = resolve_device(requested)
        if self.active and device == "cuda":
            device = f"cuda:{self.local_rank}"
        return device

    def start(self, device: str) -> None:
        if self.active and not dist.is_initialized():
            if device.startswith("cuda"):
                torch.cuda.set_device(torch.device(device))
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")

    def stop(self) -> None:
        if self.active and dist.is_initialized():
            dist.destroy_process_group()

    def wrap(self, model: torch.nn.Module, device: str) -> torch.nn.Module:
        """The model DDP-wrapped under a launcher (gradients averaged), else itself."""
        if not self.active:
            return model
        device_ids = [torch.device(device).index] if device.startswith("cuda") else None
        return DistributedDataParallel(model, device_ids=device_ids)

    def rows(self, batch_size: int) -> slice:
        """This process's rows of a global batch."""
        return slice(self.rank, batch_size, self.world_size)

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Summed over the processes (a copy on the values' device)."""
        values = values.clone()
        if self.active:
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def gather_objects(self, value) -> list:
        """Every process's ``value``, in rank order, on every process."""
        if not self.active:
            return [value]
        out = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out
