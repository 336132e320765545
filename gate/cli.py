"""``gatemix fit-gate`` and ``gatemix distill-gate``: the robust gate and its serving router.

``distill-gate`` redoes only the second stage (sampling, router training,
selection, evaluation, the artifact) over a finished fit's sequence gate:
the primal-dual loop's checkpoint holds the game's end state, so the loop
resumes at its last step and does no work.

Every field of ``FitGateConfig`` is a flag (``--batch-per-domain 16``), with the
field's own help, so the config dataclass stays the one source of truth.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing

from gatemix.errors import UserError
from gatemix.gate.config import FitGateConfig


def _flag_type(annotation):
    """argparse type and nargs for a dataclass field annotation."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = args[0]
        args = list(typing.get_args(annotation))
    if typing.get_origin(annotation) is tuple:
        return args[0], "+"
    return annotation, None


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per ``FitGateConfig`` field, with the field's own help."""
    hints = typing.get_type_hints(FitGateConfig)
    for field in dataclasses.fields(FitGateConfig):
        flag = "--" + field.name.replace("_", "-")
        help_text = field.metadata.get("help", "")
        kind, nargs = _flag_type(hints[field.name])
        default = None if field.default is dataclasses.MISSING else field.default
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        else:
            parser.add_argument(flag, type=kind, nargs=nargs, default=default, help=f"{help_text} (default: {default})")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "fit-gate",
        help="fit the robust primal-dual gate on the demo's gate split and distill it into the causal router",
        description="Minimax gate over the worst-case mixture of domains (stochastic primal-dual), "
        "structurally distilled into the per-token router the engine runs; writes a router artifact "
        "for `gatemix pack --gate`. Interrupted fits resume from their checkpoint.",
    )
    add_config_flags(parser)
    parser.set_defaults(run=run)


def add_distill_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "distill-gate",
        help="redo the structural distillation over a finished fit-gate run's sequence gate",
        description="Reuses the sequence gate of a finished `gatemix fit-gate` (same --out-dir/"
        "--work-dir and primal-dual settings) and redoes the router's distillation, selection and "
        "evaluation with the distillation flags given here.",
    )
    add_config_flags(parser)
    parser.set_defaults(run=run_distill)


def _config(args: argparse.Namespace) -> FitGateConfig:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(FitGateConfig)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    try:
        return FitGateConfig(**values)
    except (ValueError, TypeError) as exc:
        raise UserError(str(exc)) from exc


def _fit_and_report(config: FitGateConfig) -> int:
    from gatemix.gate.fit import fit_gate

    artifact = fit_gate(config)
    print(f"router {artifact.version} ({artifact.method}) for {artifact.expert_names} written to {config.out_dir}")
    return 0


def run_distill(args: argparse.Namespace) -> int:
    import torch
    from gatemix.gate.fit import fit_work_dir
    from gatemix.gate.primal_dual import CHECKPOINT_FILE

    config = _config(args)
    checkpoint = fit_work_dir(config) / "gate" / CHECKPOINT_FILE
    if not checkpoint.is_file():
        raise UserError(f"no finished fit at {checkpoint}: run `gatemix fit-gate` with these paths first")
    done = torch.load(checkpoint, weights_only=False)["step"]
    if done < config.steps:
        raise UserError(
            f"the fit at {checkpoint} stopped at step {done} of {config.steps}: "
            "finish it with `gatemix fit-gate` (it resumes)"
        )
    return _fit_and_report(config)


def run(args: argparse.Namespace) -> int:
    return _fit_and_report(_config(args))
