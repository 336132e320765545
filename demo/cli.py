"""``gatemix build-demo``: small demo experts from real text on this machine, packed."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "build-demo",
        help="build the embedded demo: tokenizer, base model, one expert per domain, composite",
        description="Collect code, legal and technical text from this machine, split it by document, "
        "train a shared tokenizer, a base Llama and one expert per domain, and pack the experts "
        "with a uniform gate into <out>/composite. Reruns reuse what is already built.",
    )
    parser.add_argument("--out", default="artifacts/demo", help="output folder (default: artifacts/demo)")
    parser.add_argument("--preset", choices=("full", "test"), default="full", help="model and data sizes")
    parser.add_argument("--seed", type=int, default=0, help="split and training seed")
    parser.set_defaults(run=run)


def ensure_demo(out: Path, preset: str = "full", seed: int = 0) -> Path:
    """Build (or reuse) the demo and its uniform-gate composite; returns the composite folder."""
    from gatemix.demo.build import build_demo
    from gatemix.demo.config import DemoConfig
    from gatemix.engine.composite_folder import CompositeInfo, PackError, pack_composite

    paths = build_demo(DemoConfig.preset(preset, out_dir=out, seed=seed))
    composite = Path(out) / "composite"
    try:
        info = CompositeInfo.read(composite)
        expected = [p.name for p in paths.expert_dirs.values()]
        from gatemix.expert_folder import expert_hash

        fresh = info.expert_names == expected and all(
            info.expert_hashes[name] == expert_hash(path) for name, path in paths.expert_dirs.items()
        )
    except (PackError, OSError, KeyError):
        fresh = False
    if not fresh:
        pack_composite(list(paths.expert_dirs.values()), composite, gate="uniform", overwrite=True)
    return composite


def run(args: argparse.Namespace) -> int:
    composite = ensure_demo(Path(args.out), args.preset, args.seed)
    print(f"demo ready: composite model at {composite}")
    return 0
