"""``gatemix distill``: the ensemble into one student model that vLLM serves alone."""

from __future__ import annotations

import argparse

from gatemix.config_cli import add_dataclass_flags, config_from_args
from gatemix.distill.config import DistillConfig


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "distill",
        help="distill the ensemble into one student model (a plain Hugging Face folder)",
        description="Train a student of an expert's architecture on the ensemble's exact mixture "
        "distributions over the project's train text (forward KL by default).",
    )
    add_dataclass_flags(parser, DistillConfig, defaults={"project": "artifacts/demo"})
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from gatemix.distill.train import distill

    config = config_from_args(args, DistillConfig, project="artifacts/demo")
    print(f"student written to {distill(config)}")
    return 0
