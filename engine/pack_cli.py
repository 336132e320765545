"""``gatemix pack --project P`` or ``gatemix pack EXPERT_DIR... --out DIR``."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from gatemix.config_cli import add_config_flags, config_from_args, field_help
from gatemix.engine.lora_pack import pack_lora_composite
from gatemix.engine.pack import pack_composite
from gatemix.engine.project_composite import pack_project, project_gate_spec
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
        "and K adapters (a project names it in [base])", show_default=False))
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
        if config.base or config.experts or config.names:
            raise UserError("--project names the experts (and [base] their base): give no expert folders, "
                            "--names or --base with it")
        project = load_project(config.project, check_data=False)
        out = config.out or project.composite_dir
        overwrite = config.overwrite or not config.out  # the project's own composite is derived
        info = pack_project(project, out, config.gate or project_gate_spec(project), overwrite)
    elif not config.experts or not config.out:
        raise UserError("give expert folders and --out, or --project")
    elif config.base:
        info = pack_lora_composite(config.base, list(config.experts), config.out, gate=config.gate or "uniform",
                                   names=_names(config), overwrite=config.overwrite)
    else:
        info = pack_composite(list(config.experts), config.out, gate=config.gate or "uniform",
                              names=_names(config), overwrite=config.overwrite)
    print(f"packed {len(info.expert_names)} experts {info.expert_names} into {info.path} (gate {info.gate_version}, {info.gate_method})")
    return 0


def _names(config: PackConfig) -> list[str] | None:
    return config.names.split(",") if config.names else None
