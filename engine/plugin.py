"""vLLM plugin entry point (``vllm.general_plugins``): registers the composite models.

It also keeps the composite's request-gate processor when a draft model is
configured (``spec_decode.keep_request_gates_with_drafts``).

vLLM calls this in every process it starts, which is why registration lives
here rather than in the server: a registration in the parent process does not
reach spawned workers.
"""


from gatemix.engine.composite_folder import COMPOSITE_ARCHITECTURE, LORA_COMPOSITE_ARCHITECTURE
from gatemix.engine.spec_decode import keep_request_gates_with_drafts

# Architecture -> the module that defines it (the class has the architecture's name).
COMPOSITE_MODULES = {
    COMPOSITE_ARCHITECTURE: "gatemix.engine.composite_model",
    LORA_COMPOSITE_ARCHITECTURE: "gatemix.engine.lora_composite_model",
}


def register() -> None:
    from vllm import ModelRegistry  # vllm loads this module while it imports itself: deferred

    for architecture, module in COMPOSITE_MODULES.items():
        if architecture not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(architecture, f"{module}:{architecture}")
    keep_request_gates_with_drafts()
