"""A random (not fitted) router for the demo experts, shared by the engine and server tests.

Its weights vary sharply with the context, so a per-token weight misaligned by
one token between the engine and the offline router would show.
"""

from __future__ import annotations

import json

import torch

from gatemix.expert_folder import expert_hash
from gatemix.gate.artifact import RouterArtifact
from gatemix.gate.router import HiddenStateRouter, RouterForm


def random_router_artifact(expert_dirs: dict, context_config=None) -> RouterArtifact:
    """A head (and a causal context model, with ``context_config``) of width 16, seed 0."""
    names = list(expert_dirs)
    torch.manual_seed(0)
    expert_config = json.loads((expert_dirs[names[0]] / "config.json").read_text())
    router = HiddenStateRouter(RouterForm(len(names), expert_config["hidden_size"], 16, context_config))
    with torch.no_grad():
        for param in router.parameters():
            param.mul_(4.0)  # sharp, context-dependent weights
    return RouterArtifact(
        router=router,
        expert_names=names,
        expert_hashes={n: expert_hash(p) for n, p in expert_dirs.items()},
        method="random-test",
    )
