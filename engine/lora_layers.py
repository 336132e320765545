"""The two layers that let one vLLM base model run K LoRA experts side by side.

The base runs on ``K * T`` rows: expert k's copy of the step's T tokens is the
k-th block of T rows. Every base projection is then one matmul over all K
blocks, so its weights are read once per step for the K experts (vLLM's own
linear layer, quantization and weight loading unchanged), and:

- ``ExpertsLoRALinear`` adds each block's own low-rank update, two batched
  matmuls over ``(K, T, in)``: ``x W^T + s_k (x A_k^T) B_k^T``;
- ``ExpertsAttention`` sends each block to its expert's own vLLM ``Attention``
  (its own KV cache: the experts' keys and values differ from the first layer on).

vLLM's LoRA layers (``vllm/lora/layers``) serve one adapter per request through
the Punica kernels and their per-token adapter mapping; here every token goes
through all K adapters, always in the same K blocks, which two ``bmm`` calls do
without that machinery.
"""

from __future__ import annotations

import torch
from torch import nn
from vllm.config import CacheConfig
from vllm.model_executor.layers.attention import Attention

from gatemix.adapter_folder import LoRAFactor

# vLLM's projection inside a decoder layer -> the Hugging Face modules stacked in it, in output order.
STACKED_PROJECTIONS = {
    "self_attn.qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "self_attn.o_proj": ("o_proj",),
    "mlp.gate_up_proj": ("gate_proj", "up_proj"),
    "mlp.down_proj": ("down_proj",),
}


class ExpertsLoRALinear(nn.Module):
    """A base projection shared by K experts, each adding its update. ``(K*T, in) -> (K*T, out)``.

    The base layer keeps its name under ``base_layer`` (as in vLLM's LoRA
    layers) and its ``(output, output_bias)`` return.
    """

    # The update reads the plain activation: no fused activation quantization before this layer.
    requires_unquantized_input = True

    def __init__(self, base_layer: nn.Module, lora_a: torch.Tensor, lora_b: torch.Tensor) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.register_buffer("lora_a", lora_a)  # (K, in, R)
        self.register_buffer("lora_b", lora_b)  # (K, R, out), each expert's scale folded in

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        output, output_bias = self.base_layer(x)
        num_experts = self.lora_a.shape[0]
        x_by_expert = x.reshape(num_experts, -1, x.shape[-1])  # (K, T, in)
        update = torch.bmm(torch.bmm(x_by_expert, self.lora_a), self.lora_b)  # (K, T, out)
        return output + update.view(output.shape), output_bias


class ExpertsAttention(nn.Module):
    """One layer's attention for K experts, each with its own KV cache. ``(K*T, heads*d) -> (K*T, heads*d)``.

    Expert ``a`` keeps the base's own ``Attention`` (and its layer name); the
    others are built like it, named ``<its name>_<key>``, so each name still
    holds the one integer vLLM reads as the layer index.
    """

    def __init__(self, attention: Attention, keys: list[str], cache_config: CacheConfig) -> None:
        super().__init__()
        self.experts = nn.ModuleDict({keys[0]: attention})
        for key in keys[1:]:
            self.experts[key] = Attention(
                attention.num_heads, attention.head_size, attention.impl.scale,
                num_kv_heads=attention.num_kv_heads, cache_config=cache_config,
                quant_config=attention.quant_config, per_layer_sliding_window=attention.sliding_window,
                prefix=f"{attention.layer_name}_{key}", attn_type=attention.attn_type,
            )

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        num_experts = len(self.experts)
        blocks = zip(self.experts.values(), query.chunk(num_experts), key.chunk(num_experts),
                     value.chunk(num_experts))
        return torch.cat([attention(q, k, v) for attention, q, k, v in blocks])


def stack_factors(
    per_expert: list[list[LoRAFactor | None]], out_sizes: list[int], in_size: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """K experts' factors of one vLLM projection -> ``A (K, in, R)``, ``B (K, R, out)`` in float32.

    ``per_expert[k][j]``: expert k's factor of the projection's j-th stacked
    module (``STACKED_PROJECTIONS``), or None where it does not adapt it. Expert
    k's rank block of module j maps onto module j's output columns; the rank is
    padded with zeros to the largest expert's. None when no expert adapts it.
    """
    ranks = [sum(factor.a.shape[0] for factor in factors if factor is not None) for factors in per_expert]
    if max(ranks) == 0:
        return None
    lora_a = torch.zeros(len(per_expert), in_size, max(ranks))
    lora_b = torch.zeros(len(per_expert), max(ranks), sum(out_sizes))
    column_starts = [sum(out_sizes[:j]) for j in range(len(out_sizes))]
    for k, factors in enumerate(per_expert):
        rank_start = 0
        for factor, column, width in zip(factors, column_starts, out_sizes):
            if factor is None:
                continue
            rank = factor.a.shape[0]
            lora_a[k, :, rank_start : rank_start + rank] = factor.a.float().T
            lora_b[k, rank_start : rank_start + rank, column : column + width] = factor.scale * factor.b.float().T
            rank_start += rank
    return lora_a, lora_b


def install_lora(
    causal_lm: nn.Module, adapters: list[dict[tuple[int, str], LoRAFactor]], dtype: torch.dtype
) -> list[str]:
    """Wrap every projection some adapter adapts in ``ExpertsLoRALinear``; returns the wrapped paths.

    ``causal_lm`` is vLLM's model of the base (``.model.layers``); ``adapters[k]``
    maps ``(layer, Hugging Face module)`` to expert k's factor. Called once the
    base's weights are loaded, as vLLM's LoRA manager wraps a loaded model.
    """
    wrapped = []
    for layer_index, layer in enumerate(causal_lm.model.layers):
        for path, modules in STACKED_PROJECTIONS.items():
            base_layer = layer.get_submodule(path)
            per_expert = [[factors.get((layer_index, module)) for module in modules] for factors in adapters]
            out_sizes = list(getattr(base_layer, "output_sizes", [base_layer.output_size]))
            stacked = stack_factors(per_expert, out_sizes, base_layer.input_size)
            if stacked is None:
                continue
            device = next(base_layer.parameters()).device
            lora_a, lora_b = (factor.to(device=device, dtype=dtype) for factor in stacked)
            parent, name = path.rsplit(".", 1)
            setattr(layer.get_submodule(parent), name, ExpertsLoRALinear(base_layer, lora_a, lora_b))
            wrapped.append(f"model.layers.{layer_index}.{path}")
    return wrapped
