"""``gatemix distill``: the ensemble into one student model that vLLM serves alone."""

from __future__ import annotations

import argparse
from pathlib import Path

from gatemix.errors import UserError


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "distill",
        help="distill the ensemble into one student model (a plain Llama folder)",
        description="Train a student of the experts' architecture on the ensemble's exact mixture "
        "distributions over the demo's train text (forward KL by default).",
    )
    parser.add_argument("--demo-dir", default="artifacts/demo", help="demo build folder")
    parser.add_argument("--composite", help="teacher composite (default: <demo-dir>/composite)")
    parser.add_argument("--out", help="student folder (default: <demo-dir>/student)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--beta", type=float, default=0.0, help="0: forward KL, 1: reverse KL")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from gatemix.distill.config import DistillConfig
    from gatemix.distill.train import distill
    from gatemix.engine.composite_folder import CompositeInfo

    demo = Path(args.demo_dir)
    composite = Path(args.composite) if args.composite else demo / "composite"
    info = CompositeInfo.read(composite)
    expert_dirs = [demo / "experts" / name for name in info.expert_names]
    text_files = [demo / "data" / name / "train.jsonl" for name in info.expert_names]
    missing = [str(p) for p in [*expert_dirs, *text_files] if not p.exists()]
    if missing:
        raise UserError(f"not found: {', '.join(missing)} (run `gatemix build-demo` first)")
    try:
        config = DistillConfig(
            composite_dir=str(composite),
            expert_dirs=[str(p) for p in expert_dirs],
            text_files=[str(p) for p in text_files],
            out_dir=args.out or str(demo / "student"),
            steps=args.steps,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            lr=args.lr,
            beta=args.beta,
        )
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    print(f"student written to {distill(config)}")
    return 0
