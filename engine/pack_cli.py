"""``gatemix pack --project P`` or ``gatemix pack EXPERT_DIR... --out DIR``."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from gatemix.config_cli import add_config_flags, config_from_args, field_help
from gatemix.engine.lora_pack import pack_lora_composite
from gatemix.engine.pack import pack_composite, project_gate_spec
from gatemix.errors import UserError
from gatemix.project import load_project


@dataclass
class PackConfig:
    """What ``gatemix pack`` packs: expert folders and a gate, or a project's."""

    experts: tuple[str, ...] = field(default=(), **field_help(
        "expert folders (Hugging Face causal-LM folders)", flag="experts", nargs="*",
        show_default=False))
    project: str | None = field(default=None, **field_help(
        "project file (or its folder): experts, names and gate from it", show_default=False))
    out: str | None = field(default=None, **field_help(
        "composite folder to write (default with --project: <work_dir>/composite)",
        show_default=False))
    gate: str | None = field(default=None, **field_help(
        "'uniform', weights 'code=0.7,legal=0.3' or '0.7,0.3', or a router artifact folder "
        "from `gatemix fit-gate` (default: the project's fitted gate if there is one, else uniform)",
        show_default=False))
    names: str | None = field(default=None, **field_help(
        "comma-separated expert names (default: folder names)", show_default=False))
    base: str | None = field(default=None, **field_help(
        "base model folder: the expert folders are PEFT LoRA adapters of it, packed as one base "
        "and K adapters (the engine slice of LoRA experts: not with --project yet)", show_default=False))
    overwrite: bool = field(default=False, **field_help(
        "replace --out if it exists", switch=True, show_default=False))


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "pack",
        help="pack expert folders and a gate into one composite model folder vLLM loads",
        description="Write one composite model folder (the experts' weights under one architecture, "
        "the expert names in order, and the gate). With --project the experts, their names and "
        "the fitted gate come from the project file and the folder is <work_dir>/composite. "
        "Refuses mismatched tokenizers or architectures vLLM cannot build before writing anything.",
    )
    add_config_flags(parser, PackConfig)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args, PackConfig)
    if config.project:
        if config.base:
            raise UserError("--base (LoRA experts) is not read with --project yet; give adapter folders and --out")
        if config.experts or config.names:
            raise UserError("--project names the experts: give no expert folders or --names with it")
        project = load_project(config.project, check_data=False)
        experts, names = list(project.experts.values()), project.domains
        out = config.out or project.composite_dir
        gate = config.gate or project_gate_spec(project)
        overwrite = config.overwrite or not config.out  # the project's own composite is derived
    else:
        if not config.experts or not config.out:
            raise UserError("give expert folders and --out, or --project")
        experts, out, gate = list(config.experts), config.out, config.gate or "uniform"
        overwrite = config.overwrite
        names = config.names.split(",") if config.names else None
    if config.base:
        info = pack_lora_composite(config.base, experts, out, gate=gate, names=names, overwrite=overwrite)
    else:
        info = pack_composite(experts, out, gate=gate, names=names, overwrite=overwrite)
    print(f"packed {len(info.expert_names)} experts {info.expert_names} into {info.path} (gate {info.gate_version}, {info.gate_method})")
    return 0
