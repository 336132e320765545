"""Swapping the served gate while the experts keep serving: ``POST /admin/gate`` and ``SIGHUP``.

The artifact is checked here first (the same experts, in the same order, with
the same weights; shapes the running engine can take; readable), so a refusal
is a 400 naming the problem and the old gate keeps serving. Then every vLLM
worker loads it between two engine steps (``collective_rpc``, see
``engine/gate_versions.py``): requests in flight finish on the gate they
started with, new ones get the new one, and the version in responses, in
``/v1/models`` and in ``gatemix_gate_info`` changes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from gatemix.engine.composite_folder import GATE_SUBDIR, CompositeInfo
from gatemix.engine.gate_reload import RELOAD_METHOD
from gatemix.engine.gate_versions import check_swappable
from gatemix.gate.artifact import ArtifactError, load_router
from gatemix.server.errors import bad_request

logger = logging.getLogger(__name__)

REPORT_FILE = Path("fit") / "report.md"  # where fit-gate leaves its report, under the artifact


class GateReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str | None = Field(
        None, description="a router artifact folder; default: the configured one (--gate-artifact)"
    )


class GateReloadResponse(BaseModel):
    version: str
    method: str
    previous_version: str | None


def gate_report(artifact_dir: Path) -> str | None:
    report = Path(artifact_dir) / REPORT_FILE
    return str(report) if report.is_file() else None


class GateAdmin:
    """The server's side of a swap: check, swap in every worker, update what the server reports."""

    def __init__(self, app_state, *, engine, composite_dir: Path, configured: Path) -> None:
        self.state = app_state  # app.state: its models and serving core are replaced on a swap
        self.engine = engine
        self.composite_dir = Path(composite_dir)
        self.configured = Path(configured)
        self._lock = asyncio.Lock()  # one swap at a time

    async def reload(self, path: str | None = None) -> GateReloadResponse:
        artifact_dir = Path(path) if path else self.configured
        artifact = await asyncio.to_thread(self._checked, artifact_dir)
        async with self._lock:
            previous = self.state.models.gate_version
            # Requests arriving until the swap below ends still get ``previous``.
            in_flight = sorted({*self.state.serving_core.gate.gate_versions_in_flight(), *([previous] if previous else [])})
            try:
                results = await self.engine.collective_rpc(RELOAD_METHOD, args=(str(artifact_dir), in_flight))
            except Exception as exc:  # noqa: BLE001 the worker re-checks; what it refuses is still bad input
                raise bad_request(f"the engine refused the gate: {exc}", "path") from None
            version = results[0]["version"]
            models = self.state.models.with_gate(version, artifact.method, gate_report(artifact_dir))
            self.state.models = models
            self.state.serving_core.models = models
            self.state.metrics.set_gate(version, models.gate_loaded_at)
        logger.info("gate %s (%s) from %s now serves new requests (was %s)", version, artifact.method,
                    artifact_dir, previous)
        return GateReloadResponse(version=version, method=artifact.method, previous_version=previous)

    def _checked(self, artifact_dir: Path):
        """Load and check the artifact against the served composite; a 400 if it cannot serve."""
        info = CompositeInfo.read(self.composite_dir)
        widths = tuple(json.loads((self.composite_dir / "config.json").read_text())["gatemix"]["expert_hidden_sizes"])
        try:
            artifact = load_router(artifact_dir)
            check_swappable(
                artifact, expert_names=info.expert_names, expert_hashes=info.expert_hashes,
                expert_widths=widths, current=load_router(self.composite_dir / GATE_SUBDIR).router,
            )
        except ArtifactError as exc:
            raise bad_request(str(exc), "path") from None
        return artifact

    def install_sighup(self) -> None:
        """``kill -HUP``: re-read the configured artifact (a refusal is logged, the old gate stays)."""
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self._on_sighup)

    def remove_sighup(self) -> None:
        asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)

    def _on_sighup(self) -> None:
        logger.info("SIGHUP: reloading the gate from %s", self.configured)
        task = asyncio.ensure_future(self.reload())
        task.add_done_callback(self._log_outcome)

    @staticmethod
    def _log_outcome(task: asyncio.Task) -> None:
        exc = task.exception()
        if exc is not None:
            logger.error("SIGHUP gate reload refused, the old gate still serves: %s", getattr(exc, "message", exc))
