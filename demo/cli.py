"""``gatemix build-demo``: small demo experts from real text on this machine, and their project file."""

from __future__ import annotations

import argparse
from pathlib import Path

from gatemix.config_cli import add_config_flags, given_values
from gatemix.defaults import DEFAULT_PROJECT_DIR
from gatemix.demo.config import PRESETS, DemoConfig


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "build-demo",
        help="build the embedded demo: tokenizer, base model, one expert per domain, the robust gate",
        description="Collect code, legal and technical text from this machine, split it by document, "
        "train a shared tokenizer, a base Llama and one expert per domain, write the project "
        "file <out>/gatemix.toml that every later job reads (fit-gate, pack, serve, distill, bench), "
        "and fit the robust gate into <out>/gate (what `gatemix serve` serves). --with-baselines "
        "also trains the parameter- and compute-matched monolithic baselines for the report and "
        "the benchmarks. Reruns reuse what is already built.",
    )
    parser.add_argument("--out", default=DEFAULT_PROJECT_DIR, help=f"output folder (default: {DEFAULT_PROJECT_DIR})")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full",
                        help="model and data sizes; any field below overrides the preset's")
    # Every other DemoConfig field is a flag; one given overrides the preset.
    add_config_flags(parser, DemoConfig, skip=("out_dir",))
    parser.set_defaults(run=run)


def ensure_demo(out: Path, preset: str = "full", **overrides) -> Path:
    """Build (or reuse) the demo, its fitted gate included; returns its project file."""
    from gatemix.demo.build import build_demo  # torch: deferred so `--help` stays fast

    return build_demo(DemoConfig.preset(preset, out_dir=out, **overrides)).project_file


def run(args: argparse.Namespace) -> int:
    project_file = ensure_demo(Path(args.out), args.preset, **given_values(args, DemoConfig))
    print(f"demo ready: project file {project_file}")
    return 0
