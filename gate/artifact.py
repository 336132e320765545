"""The versioned router artifact: ``router.safetensors`` plus ``router.json``.

The JSON names the experts in order, with the hash of each expert's weights, so
a router is never applied to experts it was not fitted for. The version is a
content hash of the weights and the metadata, so two fits that differ in
anything get different versions in responses and metrics.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from gatemix.errors import UserError
from gatemix.gate.router import HiddenStateRouter, RouterForm

ARTIFACT_FORMAT = "gatemix-router/1"
WEIGHTS_FILE = "router.safetensors"
METADATA_FILE = "router.json"


class ArtifactError(UserError):
    """A router artifact that is missing, corrupt, or does not fit the experts."""


@dataclass
class RouterArtifact:
    router: HiddenStateRouter
    expert_names: list[str]
    expert_hashes: dict[str, str]
    method: str = "constant"  # how it was fitted: constant, robust, erm, direct-robust...
    details: dict = field(default_factory=dict)  # config, final lambda, per-domain figures
    version: str = ""
    created_at: float = 0.0

    def check_experts(self, expert_names: list[str], expert_hashes: dict[str, str]) -> None:
        """Refuse a router fitted for other experts, or for the same ones in another order."""
        if list(expert_names) != list(self.expert_names):
            raise ArtifactError(
                f"router was fitted for experts {self.expert_names} in that order, "
                f"got {list(expert_names)}"
            )
        for name in expert_names:
            theirs, ours = expert_hashes.get(name), self.expert_hashes.get(name)
            if ours and theirs and ours != theirs:
                raise ArtifactError(
                    f"expert {name!r} has weights {theirs[:12]} but the router was fitted "
                    f"on {ours[:12]}"
                )


def _metadata(artifact: RouterArtifact) -> dict:
    return {
        "format": ARTIFACT_FORMAT,
        "form": artifact.router.form.to_dict(),
        "expert_names": list(artifact.expert_names),
        "expert_hashes": dict(artifact.expert_hashes),
        "method": artifact.method,
        "details": artifact.details,
    }


def _version(tensors: dict[str, torch.Tensor], metadata: dict) -> str:
    digest = hashlib.sha256(json.dumps(metadata, sort_keys=True).encode())
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].detach().float().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def save_router(artifact: RouterArtifact, out_dir: str | Path) -> RouterArtifact:
    """Write the artifact and return it with its version and creation time filled in."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in artifact.router.state_dict().items()}
    metadata = _metadata(artifact)
    artifact.version = _version(tensors, metadata)
    artifact.created_at = time.time()
    save_file(tensors, str(out_dir / WEIGHTS_FILE), metadata={"version": artifact.version})
    full = {**metadata, "version": artifact.version, "created_at": artifact.created_at}
    (out_dir / METADATA_FILE).write_text(json.dumps(full, indent=2))
    return artifact


def load_router(path: str | Path) -> RouterArtifact:
    """Load and verify an artifact folder; any inconsistency is an ``ArtifactError``."""
    path = Path(path)
    meta_path, weights_path = path / METADATA_FILE, path / WEIGHTS_FILE
    if not meta_path.is_file() or not weights_path.is_file():
        raise ArtifactError(f"{path} is not a router artifact (needs {METADATA_FILE} and {WEIGHTS_FILE})")
    try:
        meta = json.loads(meta_path.read_text())
        tensors = load_file(str(weights_path))
    except Exception as exc:  # corrupt JSON or safetensors
        raise ArtifactError(f"{path}: unreadable router artifact ({exc})") from exc
    if meta.get("format") != ARTIFACT_FORMAT:
        raise ArtifactError(f"{path}: unknown artifact format {meta.get('format')!r}")
    try:
        form = RouterForm(**meta["form"])
        router = HiddenStateRouter(form)
        router.load_state_dict(tensors, strict=True)
    except Exception as exc:
        raise ArtifactError(f"{path}: router weights do not match its form ({exc})") from exc
    metadata = {k: meta[k] for k in ("format", "form", "expert_names", "expert_hashes", "method", "details")}
    if _version(tensors, metadata) != meta.get("version"):
        raise ArtifactError(f"{path}: version hash mismatch, the artifact was modified or truncated")
    if len(meta["expert_names"]) != form.num_experts:
        raise ArtifactError(f"{path}: {len(meta['expert_names'])} expert names for {form.num_experts} experts")
    return RouterArtifact(
        router=router,
        expert_names=meta["expert_names"],
        expert_hashes=meta["expert_hashes"],
        method=meta["method"],
        details=meta["details"],
        version=meta["version"],
        created_at=meta.get("created_at", 0.0),
    )


def read_router_form(path: str | Path) -> RouterForm:
    """The router's form from an artifact's JSON alone (the engine needs it before the weights)."""
    meta_path = Path(path) / METADATA_FILE
    try:
        return RouterForm(**json.loads(meta_path.read_text())["form"])
    except Exception as exc:
        raise ArtifactError(f"{path}: no readable router form in {METADATA_FILE} ({exc})") from exc
