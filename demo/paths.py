"""Where a built demo lives: one folder per stage under the demo's root.

The layout alone, apart from the build (``build.py``), so that what reads a
demo (the tests, the CLI) names its folders without the build's imports.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gatemix.demo import corpus
from gatemix.demo.baselines import BASELINES
from gatemix.demo.config import DemoConfig

PROJECT_FILE = "gatemix.toml"


@dataclass(frozen=True)
class DemoPaths:
    """Where a built demo lives. ``expert_dirs`` is ordered like ``config.domains``.

    ``baseline_dirs`` holds the baselines that are built (and current), by name;
    ``monolithic_dir`` is the parameter-matched one's folder, or None.
    """

    root: Path
    manifest: Path
    data_dir: Path
    tokenizer_dir: Path
    base_dir: Path
    expert_dirs: dict[str, Path]
    monolithic_dir: Path | None
    eval_dir: Path
    project_file: Path
    ood_dir: Path
    gate_dir: Path
    baseline_dirs: dict[str, Path]

    @classmethod
    def for_config(cls, config: DemoConfig, built_baselines: tuple[str, ...] | None = None) -> DemoPaths:
        """The paths; ``built_baselines`` names the baselines there (default: those asked for)."""
        root = Path(config.out_dir).expanduser().resolve()
        if built_baselines is None:
            built_baselines = config.baselines if config.with_baselines else ()
        baseline_dirs = {b.name: root / b.folder for b in BASELINES if b.name in built_baselines}
        return cls(
            root=root,
            manifest=root / corpus.MANIFEST_FILE,
            data_dir=root / corpus.DATA_DIR,
            tokenizer_dir=root / "tokenizer",
            base_dir=root / "base",
            expert_dirs={domain: root / "experts" / domain for domain in config.domains},
            monolithic_dir=baseline_dirs.get("monolithic"),
            eval_dir=root / "eval",
            project_file=root / PROJECT_FILE,
            ood_dir=root / corpus.OOD_DIR,
            gate_dir=root / "gate",
            baseline_dirs=baseline_dirs,
        )

    def model_dirs(self) -> dict[str, Path]:
        """Every model by its eval-table name: base, the domains, the baselines built."""
        return {"base": self.base_dir, **self.expert_dirs, **self.baseline_dirs}
