"""``gatemix distill``: the ensemble into one student model that vLLM serves alone."""

from __future__ import annotations

import argparse

from gatemix.config_cli import add_config_flags, config_from_args
from gatemix.defaults import DEFAULT_PROJECT_DIR
from gatemix.distill.config import DistillConfig
from gatemix.process_rank import ProcessRank


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "distill",
        help="distill the ensemble into one student model (a plain Hugging Face folder)",
        description="Train a student on the ensemble's next-token distributions over the "
        "project's train text (forward KL plus the data's cross-entropy by default; domains "
        "uniform, or by the gate's lambda), with held-out figures, checkpoints and resume. "
        "Under torchrun it runs as DDP; see distill/README.md.",
    )
    add_config_flags(parser, DistillConfig, defaults={"project": DEFAULT_PROJECT_DIR})
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from gatemix.distill.train import distill  # torch: deferred so `--help` stays fast

    config = config_from_args(args, DistillConfig, project=DEFAULT_PROJECT_DIR)
    out = distill(config)
    if ProcessRank.from_env().is_main:  # under torchrun, rank 0 alone reports
        print(f"student written to {out}")
    return 0
