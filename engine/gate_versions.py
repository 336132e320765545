"""The router heads a composite serves: the current one, and older ones that requests still use.

A gate is swapped without restarting the experts (``gatemix_load_gate``, a
worker-extension method the server calls through vLLM's ``collective_rpc``,
which the engine core runs between two engine steps). A request keeps the gate
it arrived with: the server names it in the request, and its row keeps it
(``PrefixState.gate_version``), so requests in flight finish on the gate they
started with and none sees half a gate. A head is dropped only when no row uses
it and the server, at the last swap, had no request in flight naming it (the
server's count covers requests still waiting in the scheduler, which no row
shows yet).

What can be swapped in is checked here: the same experts in the same order
with the same weights, the same hidden sizes, and no router context model
(whose layers hold KV cache computed with the old weights). A posterior gate
swaps in with prefix caching on: the cache holds the experts' log-probs, not a
gate's state (``engine/slot_logprobs.py``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from gatemix.gate.artifact import ArtifactError, RouterArtifact, load_router
from gatemix.gate.router import HiddenStateRouter

logger = logging.getLogger(__name__)

class GateVersions:
    """Version -> router head; the first is the one vLLM loaded with the composite's weights."""

    def __init__(self, router: HiddenStateRouter, version: str) -> None:
        self.heads: dict[str, HiddenStateRouter] = {version: router}  # in the order loaded
        self.current = version
        self.pinned: set[str] = set()  # named by requests the server had in flight at the last swap

    @property
    def router(self) -> HiddenStateRouter:
        return self.heads[self.current]

    @property
    def any_posterior(self) -> bool:
        return any(head.form.posterior for head in self.heads.values())

    def head(self, version: str | None) -> HiddenStateRouter:
        head = self.heads.get(version or self.current)
        if head is None:  # cannot happen while the server pins what it has in flight; never fail a step
            logger.warning("gatemix gate %s is not loaded: the request gets gate %s", version, self.current)
            return self.router
        return head

    def add(self, artifact: RouterArtifact, device: torch.device, in_flight: set[str] = frozenset()) -> None:
        """Serve ``artifact`` to new requests; keep the heads ``in_flight`` (the server's) name."""
        head = HiddenStateRouter(artifact.router.form, build_context=False)
        state = {k: v for k, v in artifact.router.state_dict().items() if not k.startswith("context.")}
        head.load_state_dict(state, strict=True)
        self.heads[artifact.version] = head.float().to(device).eval().requires_grad_(False)
        self.current = artifact.version
        self.pinned = set(in_flight)

    def retire(self, versions_in_use: set[str | None]) -> None:
        """Drop the heads that neither a row (``versions_in_use``) nor a pinned request names."""
        for version in [v for v in self.heads if v != self.current]:
            if version not in versions_in_use and version not in self.pinned:
                del self.heads[version]
                logger.info("gatemix gate %s retired: no request uses it any more", version)


def check_swappable(
    artifact: RouterArtifact,
    *,
    expert_names: list[str],
    expert_hashes: dict[str, str],
    expert_widths: tuple[int, ...],
    current: HiddenStateRouter,
) -> None:
    """Refuse an artifact the running engine cannot switch to; ``ArtifactError``, one line."""
    artifact.check_experts(expert_names, expert_hashes)
    form = artifact.router.form
    if form.expert_widths != tuple(expert_widths):
        raise ArtifactError(f"the gate reads hidden sizes {form.expert_widths}, the experts have {expert_widths}")
    if form.context_config is not None or current.form.context_config is not None:
        raise ArtifactError(
            "a router with its own context model cannot be swapped while serving (its layers hold KV "
            "cache): restart the server with the new composite"
        )


def load_swappable(path: str | Path, **checks) -> RouterArtifact:
    artifact = load_router(path)
    check_swappable(artifact, **checks)
    return artifact
