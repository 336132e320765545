"""``gatemix pack EXPERT_DIR... --gate GATE --out DIR``."""

from __future__ import annotations

import argparse

from gatemix.engine.composite_folder import pack_composite


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "pack",
        help="pack expert folders and a gate into one composite model folder vLLM loads",
        description="Write one composite model folder (the experts' weights under one architecture, "
        "the expert names in order, and the gate). Refuses mismatched tokenizers or architectures "
        "before writing anything.",
    )
    parser.add_argument("experts", nargs="+", help="expert folders (Hugging Face Llama folders)")
    parser.add_argument("--out", required=True, help="composite folder to write")
    parser.add_argument(
        "--gate",
        default="uniform",
        help="'uniform', weights 'code=0.7,legal=0.3' or '0.7,0.3', or a router artifact folder "
        "from `gatemix fit-gate` (default: uniform)",
    )
    parser.add_argument("--names", help="comma-separated expert names (default: folder names)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    names = args.names.split(",") if args.names else None
    info = pack_composite(args.experts, args.out, gate=args.gate, names=names, overwrite=args.overwrite)
    print(f"packed {len(info.expert_names)} experts {info.expert_names} into {info.path} (gate {info.gate_version}, {info.gate_method})")
    return 0
