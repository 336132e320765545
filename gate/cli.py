"""``gatemix fit-gate`` and ``gatemix distill-gate``: the robust gate and its serving router.

``distill-gate`` redoes only the second stage (router training, selection,
evaluation, the artifact) over a finished fit's saved sequence gate and game
state; the primal-dual game is not replayed.

Every field of ``FitGateConfig`` is a flag (``--batch-per-domain 16``), with the
field's own help, so the config dataclass stays the one source of truth.
Both run under ``torchrun`` as they are: every process scores its share of the
text (one GPU each), and rank 0 fits.
"""

from __future__ import annotations

import argparse

from gatemix.config_cli import add_dataclass_flags, config_from_args
from gatemix.gate.config import FitGateConfig


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "fit-gate",
        help="fit the robust primal-dual gate on a project's gate split and distill it into the causal router",
        description="Minimax gate over the worst-case mixture of domains (stochastic primal-dual), "
        "structurally distilled into the per-token router the engine runs; writes a router artifact "
        "for `gatemix pack --gate` (default: <project work_dir>/gate). Interrupted fits resume from "
        "their checkpoint. Under torchrun the experts' scoring is sharded across the processes.",
    )
    add_dataclass_flags(parser, FitGateConfig)
    parser.set_defaults(run=run)


def add_distill_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "distill-gate",
        help="redo the structural distillation over a finished fit-gate run's sequence gate",
        description="Reuses the sequence gate of a finished `gatemix fit-gate` (same project, "
        "--out-dir/--work-dir and data) and redoes the router's distillation, selection and "
        "evaluation with the distillation flags given here.",
    )
    add_dataclass_flags(parser, FitGateConfig)
    parser.set_defaults(run=run_distill)


def _report(artifact, config: FitGateConfig) -> int:
    if artifact is not None:  # None: a scoring rank of a sharded launch
        details = artifact.details
        served = details.get("served_router")
        print(f"router {artifact.version} ({artifact.method}, serving {served}) for "
              f"{artifact.expert_names} written")
        games = dict(details.get("family") or {})
        if details.get("sequence_gate"):
            games["sequence gate"] = details["sequence_gate"]
        for name, game in games.items():
            gap = game.get("gap") or {}
            if "total" in gap:
                print(f"  {name}: final duality gap {gap['total']:.4f} nats/token "
                      f"(lambda side {gap['lambda_side']:.4f})")
    return 0


def run(args: argparse.Namespace) -> int:
    from gatemix.gate.fit import fit_gate

    config = config_from_args(args, FitGateConfig)
    return _report(fit_gate(config), config)


def run_distill(args: argparse.Namespace) -> int:
    from gatemix.gate.fit import distill_gate

    config = config_from_args(args, FitGateConfig)
    return _report(distill_gate(config), config)
