"""vLLM plugin entry point (``vllm.general_plugins``): registers the composite model.

vLLM calls this in every process it starts, which is why registration lives
here rather than in the server: a registration in the parent process does not
reach spawned workers.
"""


from gatemix.engine.composite_folder import COMPOSITE_ARCHITECTURE


def register() -> None:
    from vllm import ModelRegistry  # vllm loads this module while it imports itself: deferred

    if COMPOSITE_ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(
            COMPOSITE_ARCHITECTURE, f"gatemix.engine.composite_model:{COMPOSITE_ARCHITECTURE}"
        )
