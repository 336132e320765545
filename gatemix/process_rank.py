"""Which process of a launch this is: the one place that reads the launcher's variables.

``torchrun`` (and any launcher that follows its convention) sets ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK``; a plain ``python`` run has none and is the
only process. Feature scoring shards by it, distillation runs DDP over it, and
the CLIs let rank 0 alone report.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class ProcessRank:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> ProcessRank:
        """The launcher's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``, else one process."""
        return cls(
            rank=int(os.environ.get("RANK", "0")),
            world_size=int(os.environ.get("WORLD_SIZE", "1")),
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        )

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        """The first process of its node (each node keeps node-local files, e.g. a teacher cache)."""
        return self.local_rank == 0
