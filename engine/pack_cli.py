"""``gatemix pack --project P`` or ``gatemix pack EXPERT_DIR... --out DIR``."""

from __future__ import annotations

import argparse

from gatemix.engine.composite_folder import pack_composite, project_gate_spec
from gatemix.errors import UserError


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "pack",
        help="pack expert folders and a gate into one composite model folder vLLM loads",
        description="Write one composite model folder (the experts' weights under one architecture, "
        "the expert names in order, and the gate). With --project the experts, their names and "
        "the fitted gate come from the project file and the folder is <work_dir>/composite. "
        "Refuses mismatched tokenizers or architectures vLLM cannot build before writing anything.",
    )
    parser.add_argument("experts", nargs="*", help="expert folders (Hugging Face causal-LM folders)")
    parser.add_argument("--project", help="project file (or its folder): experts, names and gate from it")
    parser.add_argument("--out", help="composite folder to write (default with --project: <work_dir>/composite)")
    parser.add_argument(
        "--gate",
        help="'uniform', weights 'code=0.7,legal=0.3' or '0.7,0.3', or a router artifact folder "
        "from `gatemix fit-gate` (default: the project's fitted gate if there is one, else uniform)",
    )
    parser.add_argument("--names", help="comma-separated expert names (default: folder names)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.project:
        from gatemix.project import load_project

        if args.experts or args.names:
            raise UserError("--project names the experts: give no expert folders or --names with it")
        project = load_project(args.project, check_data=False)
        experts, names = list(project.experts.values()), project.domains
        out = args.out or project.composite_dir
        gate = args.gate or project_gate_spec(project)
        overwrite = args.overwrite or not args.out  # the project's own composite is derived
    else:
        if not args.experts or not args.out:
            raise UserError("give expert folders and --out, or --project")
        experts, out, gate, overwrite = args.experts, args.out, args.gate or "uniform", args.overwrite
        names = args.names.split(",") if args.names else None
    info = pack_composite(experts, out, gate=gate, names=names, overwrite=overwrite)
    print(f"packed {len(info.expert_names)} experts {info.expert_names} into {info.path} (gate {info.gate_version}, {info.gate_method})")
    return 0
