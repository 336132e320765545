"""``gatemix fit-gate``: the robust gate and its serving router, every stage or the router's.

``--stage router`` redoes only the router's stages (router fit, selection,
evaluation, the artifact) over a finished fit's saved sequence gate and game
state; the primal-dual game is not replayed. ``gatemix distill-gate``, that
stage's old name, still works: it warns once and runs ``--stage router``.

Every field of ``FitGateConfig`` is a flag (``--batch-per-domain 16``), with the
field's own help, so the config dataclass stays the one source of truth.
Both run under ``torchrun`` as they are: every process scores its share of the
text (one GPU each), and rank 0 fits.
"""

from __future__ import annotations

import argparse
import sys

from gatemix.config_cli import add_config_flags, config_from_args
from gatemix.gate.fit.config import FIT_STAGES, FitGateConfig

DEPRECATED_ALIAS = "gatemix distill-gate is deprecated; use gatemix fit-gate --stage router"


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "fit-gate",
        help="fit the robust primal-dual gate on a project's gate split and the causal router to it",
        description="Minimax gate over the worst-case mixture of domains (stochastic primal-dual), "
        "and the per-token router the engine runs fitted to it; writes a router artifact "
        "for `gatemix pack --gate` (default: <project work_dir>/gate). Interrupted fits resume from "
        "their checkpoint. Under torchrun the experts' scoring is sharded across the processes.",
    )
    parser.add_argument(
        "--stage", choices=FIT_STAGES, default="all",
        help="'all' stages, or 'router': reuse the sequence gate of a finished fit (same project, "
        "--out-dir/--work-dir and data) and redo the router's fit, selection and evaluation "
        "(default: all)",
    )
    add_config_flags(parser, FitGateConfig)
    parser.set_defaults(run=run)


def add_alias_parser(subparsers) -> None:
    """``gatemix distill-gate``: the deprecated name of ``fit-gate --stage router``."""
    parser = subparsers.add_parser(
        "distill-gate",
        help="deprecated: use `gatemix fit-gate --stage router`",
        description=f"{DEPRECATED_ALIAS}. Reuses the sequence gate of a finished `gatemix fit-gate` "
        "and redoes the router's fit, selection and evaluation with the flags given here.",
    )
    add_config_flags(parser, FitGateConfig)
    parser.set_defaults(run=run_alias, stage="router")


def _report(artifact) -> int:
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
    # The pipeline is imported here, not at the top: it imports torch and transformers'
    # users, and `gatemix fit-gate --help` should stay fast.
    from gatemix.gate.fit.pipeline import fit_gate

    config = config_from_args(args, FitGateConfig)
    return _report(fit_gate(config, stage=args.stage))


def run_alias(args: argparse.Namespace) -> int:
    print(DEPRECATED_ALIAS, file=sys.stderr)
    return run(args)
