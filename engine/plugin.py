"""vLLM plugin entry point (``vllm.general_plugins``): registers the composite model.

vLLM calls this in every process it starts, which is why registration lives
here rather than in the server: a registration in the parent process does not
reach spawned workers.
"""


def register() -> None:
    from vllm import ModelRegistry

    if "GatemixForCausalLM" not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(
            "GatemixForCausalLM", "gatemix.engine.composite_model:GatemixForCausalLM"
        )
