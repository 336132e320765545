"""``gatemix bench engine``, ``gatemix bench mixing`` and ``gatemix bench serve``.

Each bench's flags come from its config dataclass (:mod:`gatemix.config_cli`).
The models come from the project file (``--project``, default the demo's
folder): its experts in order, its composite (packed by ``ensure_composite``
when missing or stale) unless ``--composite`` names one, and its first expert as
the single-model baseline. ``bench engine --random-experts K`` writes its own.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from gatemix.config_cli import add_dataclass_flags, config_from_args
from gatemix.errors import UserError

if TYPE_CHECKING:
    from gatemix.project import Project

logger = logging.getLogger(__name__)

DEFAULT_PROJECT = "artifacts/demo"  # the demo's folder: `gatemix build-demo` writes gatemix.toml there


@dataclass(frozen=True)
class BenchModels:
    """The folders one bench run loads."""

    composite_dir: Path
    expert_dirs: list[Path]  # the composite's experts, in its order (naive and lockstep baselines)
    single_dir: Path  # the single-expert baseline
    student_dir: Path | None = None
    names: list[str] = field(default_factory=list)

    def describe(self) -> dict:
        return {"composite": str(self.composite_dir), "experts": [str(d) for d in self.expert_dirs],
                "single": str(self.single_dir),
                "student": str(self.student_dir) if self.student_dir else None}


def load_bench_project(path: str) -> Project:
    """The project, without its data (the benches read only models)."""
    from gatemix.project import ProjectError, load_project

    try:
        return load_project(path, check_data=False)
    except ProjectError as exc:
        if Path(path) == Path(DEFAULT_PROJECT) and not Path(path, "gatemix.toml").is_file():
            raise UserError(f"{exc}; build the demo (`gatemix build-demo --out {DEFAULT_PROJECT}`) "
                            "or pass --project") from exc
        raise


def project_models(project_path: str, *, composite: str | None = None,
                   expert: str | None = None) -> tuple[Project, BenchModels]:
    """The project and its models: its experts, ``composite`` or its own composite, one expert alone."""
    from gatemix.engine.composite_folder import CompositeInfo, ensure_composite

    project = load_bench_project(project_path)
    if composite is None:
        info = ensure_composite(project)
    else:
        if not Path(composite).is_dir():
            raise UserError(f"composite folder {composite} not found")
        info = CompositeInfo.read(composite)
        if info.expert_names != project.domains:
            raise UserError(f"{composite} holds experts {info.expert_names}, the project "
                            f"{project.path} names {project.domains}; pass its --project")
    single = Path(expert) if expert else next(iter(project.experts.values()))
    if not (single / "config.json").is_file():
        raise UserError(f"expert folder {single} not found (no config.json)")
    return project, BenchModels(composite_dir=Path(info.path), expert_dirs=list(project.experts.values()),
                                single_dir=single, names=project.domains)


def check_context(models: BenchModels, tokens: int) -> None:
    """Refuse prompt + output lengths beyond the experts' context (the composite's is the shortest)."""
    config = json.loads((models.composite_dir / "config.json").read_text())
    context = config.get("max_position_embeddings")
    if context and tokens > context:
        raise UserError(f"prompt + output = {tokens} tokens exceed the experts' context of {context}; "
                        "lower the prompt or output length")


# ---------------------------------------------------------------- the parsers
def add_parser(subparsers) -> None:
    from gatemix.bench.engine_bench import EngineBenchConfig, RandomExpertsConfig
    from gatemix.bench.mixing_bench import MixingBenchConfig

    parser = subparsers.add_parser("bench", help="side-by-side speed benchmarks (ratios from one run)")
    benches = parser.add_subparsers(dest="bench", required=True, metavar="BENCH")
    engine = benches.add_parser(
        "engine", help="fused ensemble vs one expert vs a naive transformers ensemble",
        description="Decode tokens/s of the fused ensemble (the composite in vLLM), one expert "
        "alone in vLLM and a naive transformers loop, and E = K*tps(ensemble)/tps(single). "
        "The experts are the project's, or K random-init ones of any size (--random-experts).",
    )
    add_dataclass_flags(engine, EngineBenchConfig, skip=("random",))
    random_group = engine.add_argument_group(
        "random experts", "bench K random-init experts of this shape instead of the project's "
        "(written once under --random-cache-dir, packed with a uniform gate)")
    add_dataclass_flags(random_group, RandomExpertsConfig)
    engine.set_defaults(run=run_engine)
    mixing = benches.add_parser("mixing", help="the mixing step alone: fused vs two-pass log-softmax")
    add_dataclass_flags(mixing, MixingBenchConfig)
    mixing.set_defaults(run=run_mixing)
    try:
        from gatemix.bench.serve_bench import add_serve_bench_parser
    except ImportError:  # the serve bench's HTTP and process tools are not installed
        return
    add_serve_bench_parser(benches)


def run_mixing(args: argparse.Namespace) -> int:
    from gatemix.bench.mixing_bench import MixingBenchConfig, format_mixing_bench, run_mixing_bench

    config = config_from_args(args, MixingBenchConfig)
    rows = run_mixing_bench(dtype=config.torch_dtype, device=config.device, repeats=config.repeats,
                            rounds=config.rounds, seed=config.seed)
    print(format_mixing_bench(rows))
    if config.json:
        Path(config.json).write_text(json.dumps(rows, indent=2))
    return 0


def run_engine(args: argparse.Namespace) -> int:
    from gatemix.bench.engine_bench import (
        EngineBenchConfig,
        RandomExpertsConfig,
        format_engine_bench,
        random_models,
        run_engine_bench,
    )

    random = config_from_args(args, RandomExpertsConfig)
    config = config_from_args(args, EngineBenchConfig, random=random)
    if random.random_experts:
        models = random_models(random)
    else:
        models = project_models(config.project, composite=config.composite, expert=config.expert)[1]
    check_context(models, config.max_model_len)
    result = run_engine_bench(config, models)
    print(format_engine_bench(result, config))
    if config.json:
        Path(config.json).write_text(json.dumps(result, indent=2))
    return 0
