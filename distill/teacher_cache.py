"""The teacher's targets, scored once per window and kept on disk.

The experts are the expensive part of distillation (K forwards per batch, each
the student's size or larger), and the data windows are fixed (``data.WindowSet``),
so each window's targets are scored on first use and written to a memory-mapped
array, one row per window id. A rerun, a resumed run or a second student drawn
with the same seed reads them back and never runs the experts for them; a
second student with another seed scores only the windows not seen before.
On-policy sequences are new every step and always scored live.

The folder's name hashes everything the targets depend on: the experts' weight
hashes, the served gate's version, the teacher dtype, k, the window tokens
and ``TEACHER_VERSION`` (bumped when the teacher's computation changes). Rows
are written before their ``filled`` flag, so an interrupted write is scored
again rather than read half-written. Processes of one node share the files
(each writes the rows of its own windows); under several nodes each node keeps
its own cache unless the folder is on a shared file system.

Size: dense (k = 0) stores ``V`` float32 per token; top-k stores ``k + 1``
float32 and ``k`` int32. The files are sparse: only the windows drawn take disk.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from gatemix.atomic_write import atomic_file, write_atomically
from gatemix.distill.data import WindowSet
from gatemix.distill.loss import TeacherTargets, teacher_targets
from gatemix.errors import UserError

logger = logging.getLogger(__name__)

TEACHER_VERSION = "distill-teacher/1"
META_FILE = "meta.json"
CREATING = ".creating"  # made atomically by the one process that writes a new cache


class TeacherCacheError(UserError):
    """A teacher cache folder that cannot be read; one line."""


def cache_key(*, expert_hashes: list[str], gate_version: str, dtype: str, top_k: int,
              vocab_size: int, windows: WindowSet) -> str:
    """A folder name for one split's targets: everything they depend on, hashed."""
    digest = hashlib.sha256("|".join(
        [TEACHER_VERSION, *expert_hashes, gate_version, dtype, str(top_k), str(vocab_size),
         ",".join(windows.domains)]).encode())
    digest.update(windows.all_windows().numpy().tobytes())
    return digest.hexdigest()[:24]


class TeacherCache:
    """One split's targets: ``logprobs`` ``(W, T, width)``, ``indices`` ``(W, T, k)``, ``filled`` ``(W,)``."""

    def __init__(self, directory: Path, arrays: dict[str, np.ndarray]) -> None:
        self.directory = directory
        self.arrays = arrays

    @classmethod
    def create(cls, directory: str | Path, *, num_windows: int, seq_len: int, vocab_size: int,
               top_k: int) -> TeacherCache:
        """Open the folder's arrays, creating them (sparse, all unfilled) when absent.

        Safe to call from one process per node at once, on a shared file system
        too: the first to make ``.creating`` writes the arrays, the others wait
        for ``meta.json``.
        """
        directory = Path(directory)
        if (directory / META_FILE).is_file():
            return cls.open(directory)
        directory.mkdir(parents=True, exist_ok=True)
        lock = directory / CREATING
        try:
            lock.mkdir()
        except FileExistsError:
            return cls._wait_for(directory)
        dense = top_k == 0 or top_k >= vocab_size
        shapes = {"logprobs": ((num_windows, seq_len, vocab_size if dense else top_k + 1),
                               np.float32),
                  "filled": ((num_windows,), np.uint8)}
        if not dense:
            shapes["indices"] = ((num_windows, seq_len, top_k), np.int32)
        for name, (shape, dtype) in shapes.items():
            with atomic_file(directory / f"{name}.npy") as staging:
                array = np.lib.format.open_memmap(staging, mode="w+", dtype=dtype, shape=shape)
                del array  # unmapped, flushed: a header and a sparse file of zeros
        meta = {"format": TEACHER_VERSION, "num_windows": num_windows, "seq_len": seq_len,
                "vocab_size": vocab_size, "top_k": 0 if dense else top_k}
        write_atomically(directory / META_FILE, json.dumps(meta, indent=1))
        lock.rmdir()
        logger.info("teacher cache created at %s", directory)
        return cls.open(directory)

    @classmethod
    def _wait_for(cls, directory: Path, timeout_s: float = 600.0) -> TeacherCache:
        deadline = time.monotonic() + timeout_s
        while not (directory / META_FILE).is_file():
            if time.monotonic() > deadline:
                raise TeacherCacheError(
                    f"{directory}: another process began this teacher cache and did not finish "
                    f"in {timeout_s:.0f}s; remove {CREATING} if no run is creating it")
            time.sleep(0.2)
        return cls.open(directory)

    @classmethod
    def open(cls, directory: str | Path) -> TeacherCache:
        directory = Path(directory)
        try:
            meta = json.loads((directory / META_FILE).read_text())
            names = ["logprobs", "filled"] + (["indices"] if meta["top_k"] else [])
            arrays = {name: np.load(directory / f"{name}.npy", mmap_mode="r+") for name in names}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise TeacherCacheError(
                f"{directory}: unreadable teacher cache ({exc}); delete the folder or pass "
                "--no-teacher-cache") from exc
        if meta.get("format") != TEACHER_VERSION or arrays["filled"].shape != (meta["num_windows"],):
            raise TeacherCacheError(f"{directory}: a teacher cache of another format or size; "
                                    "delete the folder")
        return cls(directory, arrays)

    def filled(self, window_ids: torch.Tensor) -> torch.Tensor:
        """``(B,)`` ids -> ``(B,)`` bool: their targets are on disk."""
        return torch.from_numpy(self.arrays["filled"][window_ids.numpy()] == 1)

    def read(self, window_ids: torch.Tensor) -> TeacherTargets:
        rows = window_ids.numpy()
        logprobs = torch.from_numpy(np.ascontiguousarray(self.arrays["logprobs"][rows]))
        indices = None
        if "indices" in self.arrays:
            indices = torch.from_numpy(self.arrays["indices"][rows].astype(np.int64))
        return TeacherTargets(indices, logprobs)

    def write(self, window_ids: torch.Tensor, targets: TeacherTargets) -> None:
        rows = window_ids.numpy()
        self.arrays["logprobs"][rows] = targets.logprobs.float().cpu().numpy()
        if "indices" in self.arrays:
            self.arrays["indices"][rows] = targets.indices.cpu().numpy().astype(np.int32)
            self.arrays["indices"].flush()
        self.arrays["logprobs"].flush()
        self.arrays["filled"][rows] = 1  # after the rows are flushed, never before
        self.arrays["filled"].flush()

    def filled_count(self) -> int:
        return int(self.arrays["filled"].sum())


class TeacherTargetSource:
    """The teacher's targets for data windows (through the cache) and for new sequences (live)."""

    def __init__(self, teacher, top_k: int, cache: TeacherCache | None = None) -> None:
        self.teacher = teacher  # EnsembleTeacher: (B, T) ids -> (B, T, V) mixture log-probs, ...
        self.top_k = top_k
        self.cache = cache
        self.scored_windows = 0  # windows this process ran the experts for

    def live(self, input_ids: torch.Tensor) -> TeacherTargets:
        """Score sequences now: ``(B, T)`` -> targets on the CPU."""
        if input_ids.shape[0] == 0:
            raise ValueError("no sequences to score")
        mixture_logprobs, _ = self.teacher(input_ids)  # (B, T, V)
        return teacher_targets(mixture_logprobs, self.top_k).to("cpu")

    def for_windows(self, window_ids: torch.Tensor, input_ids: torch.Tensor) -> TeacherTargets:
        """Targets of ``(B,)`` data windows whose tokens are ``(B, T)``, scoring only the unseen."""
        if self.cache is None:
            self.scored_windows += len(window_ids)
            return self.live(input_ids)
        unique_ids, first = _unique_first(window_ids)
        missing = ~self.cache.filled(unique_ids)
        if missing.any():
            rows = first[missing]
            self.cache.write(unique_ids[missing], self.live(input_ids[rows]))
            self.scored_windows += int(missing.sum())
        return self.cache.read(window_ids)


def _unique_first(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct ids (ascending) and, for each, the row where it first occurs."""
    unique_ids, inverse = torch.unique(ids, return_inverse=True)
    rows = torch.arange(len(ids))
    first = torch.full((len(unique_ids),), len(ids), dtype=torch.long).scatter_reduce(
        0, inverse, rows, reduce="amin")
    return unique_ids, first
