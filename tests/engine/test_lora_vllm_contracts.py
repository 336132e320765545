"""The vLLM internals the LoRA composite relies on, one contract each (``engine/lora_layers.py``).

The LoRA composite swaps two kinds of submodule inside vLLM's own Llama-family
classes: each layer's ``self_attn.attn`` (for ``ExpertsAttention``) and its
adapted projections (for ``ExpertsLoRALinear``). That is exact only while those
classes call them as below, so an upgrade that changes it fails here, by name.
"""

from __future__ import annotations

import inspect

import pytest

FAMILY = {  # vLLM module -> (attention class, MLP class)
    "llama": ("LlamaAttention", "LlamaMLP"),
    "mistral": ("MistralAttention", "MistralMLP"),
    "qwen2": ("Qwen2Attention", "Qwen2MLP"),
    "qwen3": ("Qwen3Attention", "Qwen3MLP"),
}


@pytest.mark.parametrize("family", list(FAMILY))
def test_the_family_calls_its_projections_and_attention_as_the_lora_layers_expect(family):
    import importlib

    module = importlib.import_module(f"vllm.model_executor.models.{family}")
    attention_class, mlp_class = FAMILY[family]
    attention = inspect.getsource(getattr(module, attention_class).forward)
    assert "self.qkv_proj(hidden_states)" in attention
    assert "self.attn(q, k, v)" in attention  # ExpertsAttention takes q, k, v of K blocks of rows
    assert "self.o_proj(attn_output)" in attention
    mlp = inspect.getsource(getattr(module, mlp_class).forward)
    assert "self.gate_up_proj(x)" in mlp and "self.down_proj(x)" in mlp


def test_a_layer_that_asks_for_the_plain_activation_gets_no_fused_quantization():
    """``ExpertsLoRALinear`` adds ``x A B`` to ``down_proj``: x must not arrive quantized."""
    from vllm.model_executor.layers.fusion.quant_activation import get_input_quant_key

    from gatemix.engine.lora_layers import ExpertsLoRALinear

    assert ExpertsLoRALinear.requires_unquantized_input is True
    assert "requires_unquantized_input" in inspect.getsource(get_input_quant_key)


def test_each_experts_attention_name_holds_the_layer_index():
    """Expert k's attention at layer 7 is ``<the base's name>_<key>``: its one integer is still 7."""
    from vllm.model_executor.models.utils import extract_layer_index

    assert extract_layer_index("ensemble.base.model.layers.7.self_attn.attn") == 7
    assert extract_layer_index("ensemble.base.model.layers.7.self_attn.attn_ab") == 7


def test_the_loader_streams_only_the_top_folders_weights():
    """The base's files are streamed; ``adapters/<key>/*.safetensors`` are read by the composite itself."""
    from vllm.model_executor.model_loader import default_loader

    source = inspect.getsource(default_loader.DefaultModelLoader._prepare_weights)
    assert "glob.glob(os.path.join(hf_folder, pattern))" in source
