"""The worker-side method the server calls to swap a composite's gate while serving.

vLLM mixes ``GateReloadExtension`` into every worker (``worker_extension_cls``);
``AsyncLLM.collective_rpc("gatemix_load_gate", args=(artifact_dir, in_flight))`` then runs
it in each worker between two engine steps (``gate_versions`` says what can be
swapped and how requests in flight keep their gate).
"""

from __future__ import annotations

RELOAD_METHOD = "gatemix_load_gate"
WORKER_EXTENSION = "gatemix.engine.gate_reload.GateReloadExtension"


class GateReloadExtension:
    def gatemix_load_gate(self, artifact_dir: str, in_flight: list[str] = ()) -> dict:
        """``{"version", "method"}`` of the gate now serving new requests; raises if refused.

        ``in_flight``: the gate versions the server's unfinished requests name,
        kept loaded for them.
        """
        return self.model_runner.get_model().load_gate(artifact_dir, list(in_flight))
