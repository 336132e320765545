"""vLLM plugin entry point (``vllm.general_plugins``): registers the composite model.

It also keeps the composite's request-gate processor when a draft model is
configured (``spec_decode.keep_request_gates_with_drafts``).

vLLM calls this in every process it starts, which is why registration lives
here rather than in the server: a registration in the parent process does not
reach spawned workers.
"""


from gatemix.engine.composite_folder import COMPOSITE_ARCHITECTURE
from gatemix.engine.spec_decode import keep_request_gates_with_drafts


def register() -> None:
    from vllm import ModelRegistry  # vllm loads this module while it imports itself: deferred

    if COMPOSITE_ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(
            COMPOSITE_ARCHITECTURE, f"gatemix.engine.composite_model:{COMPOSITE_ARCHITECTURE}"
        )
    keep_request_gates_with_drafts()
