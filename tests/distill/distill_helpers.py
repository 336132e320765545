"""Settings and helpers shared by the distillation tests (imported by name: tests are no package)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

# A run small enough for seconds on two CPU cores.
TINY = {"steps": 4, "batch_size": 4, "seq_len": 32, "eval_tokens": 128, "eval_every": 2,
        "checkpoint_every": 2, "warmup_steps": 1, "lr": 2e-3, "progress": False, "threads": 2}
GATE_LAMBDA = {"code": 0.6, "legal": 0.3, "docs": 0.1}


def copy_model_folder(source: Path, target: Path, **config_changes) -> Path:
    """A copy of a model folder, its config.json changed by ``config_changes``."""
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    config.update(config_changes)
    (target / "config.json").write_text(json.dumps(config))
    return target
