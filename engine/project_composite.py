"""A project's own composite (``<work_dir>/composite``): which gate it serves, whether it is current,
and packing it from the project's experts, full folders or LoRA adapters of one base.

Jobs call ``ensure_composite`` rather than pack: a composite that already holds
the project's experts (by weights hash) and its gate is reused as it is.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from gatemix.adapter_folder import AdapterExpert
from gatemix.engine.composite_folder import GATE_SUBDIR, CompositeInfo, PackError
from gatemix.engine.lora_pack import pack_lora_composite
from gatemix.engine.pack import pack_composite
from gatemix.expert_folder import ExpertFolder
from gatemix.gate.artifact import METADATA_FILE, ArtifactError, load_router
from gatemix.project import Project

logger = logging.getLogger(__name__)


def project_gate_spec(project: Project) -> str:
    """The gate a project serves: its fitted router artifact when there is one, else uniform."""
    return str(project.gate_dir) if (project.gate_dir / METADATA_FILE).is_file() else "uniform"


def composite_is_current(info: CompositeInfo, experts: list[ExpertFolder | AdapterExpert], gate_spec: str) -> bool:
    """The composite holds these experts (same names, order and weights) and this gate."""
    if info.expert_names != [expert.name for expert in experts]:
        return False
    if any(info.expert_hashes.get(expert.name) != expert.weights_hash for expert in experts):
        return False
    if gate_spec == "uniform":
        return info.gate_method == "constant" and _is_uniform(info)
    try:
        return load_router(gate_spec).version == info.gate_version
    except ArtifactError:
        return False


def _is_uniform(info: CompositeInfo) -> bool:
    artifact = load_router(info.path / GATE_SUBDIR)
    out = artifact.router.proj_out
    return bool((out.weight == 0).all()) and bool(torch.allclose(out.bias, out.bias[0].expand_as(out.bias)))


def ensure_composite(project: Project, gate: str | None = None) -> CompositeInfo:
    """The project's composite (``<work_dir>/composite``), packed again when missing or stale.

    ``gate`` defaults to ``project_gate_spec``: after ``gatemix fit-gate`` the
    fitted router, before it the uniform gate.
    """
    gate_spec = gate or project_gate_spec(project)
    experts = project.expert_folders()
    try:
        info = CompositeInfo.read(project.composite_dir)
        if composite_is_current(info, experts, gate_spec):
            return info
    except (PackError, OSError):
        pass
    logger.info("packing %s with gate %s into %s", project.domains, gate_spec, project.composite_dir)
    return pack_project(project, project.composite_dir, gate_spec, overwrite=True)


def pack_project(project: Project, out: str | Path, gate: str, overwrite: bool) -> CompositeInfo:
    """Pack the project's experts under their names: a LoRA composite when they are adapters."""
    if project.is_lora:
        return pack_lora_composite(project.expert_folders()[0].base.path, list(project.experts.values()), out,
                                   gate=gate, names=project.domains, overwrite=overwrite)
    return pack_composite(list(project.experts.values()), out, gate=gate, names=project.domains,
                          overwrite=overwrite)
