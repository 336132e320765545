"""``gatemix distill``: the ensemble into one student model that vLLM serves alone."""

from __future__ import annotations

import argparse
import os

from gatemix.config_cli import add_dataclass_flags, config_from_args
from gatemix.distill.config import DistillConfig


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "distill",
        help="distill the ensemble into one student model (a plain Hugging Face folder)",
        description="Train a student on the ensemble's next-token distributions over the "
        "project's train text (forward KL plus the data's cross-entropy by default; domains "
        "uniform, or by the gate's lambda), with held-out figures, checkpoints and resume. "
        "Under torchrun it runs as DDP; see distill/README.md.",
    )
    add_dataclass_flags(parser, DistillConfig, defaults={"project": "artifacts/demo"})
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from gatemix.distill.train import distill

    config = config_from_args(args, DistillConfig, project="artifacts/demo")
    out = distill(config)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 alone reports
        print(f"student written to {out}")
    return 0
