"""GatemixLoRAForCausalLM: K LoRA adapters of one base as one vLLM model, mixed exactly.

The base is built once, from vLLM's own class for its architecture (Llama,
Mistral, Qwen2, Qwen3), and serves every expert: each step runs it on ``K * T``
rows, expert k's copy of the T tokens being the k-th block (``lora_layers``).
Each shared projection is one matmul over all K blocks, so the base's weights
are read once per layer per step for the K experts; each adapted projection
adds the experts' low-rank updates in two batched matmuls; each expert keeps
its own KV cache (one vLLM ``Attention`` per expert per layer). The LM head is
also one matmul over the K experts' rows.

Memory: the base's weights once, plus each expert's factors (``r * (in + out)``
per adapted projection) and its KV cache. Compute per token is K times the
base's, as for K full experts: on a GPU the saving is the weight traffic, which
dominates decoding at small batches.

Everything downstream of the experts' hidden states is the full composite's
(``GatemixForCausalLM``): the router and its posterior state, pins and subsets,
gate reload, the mixing step and the draft's verification. The hidden states
are laid out as the full composite lays out K experts of one width.

Not yet: tensor or pipeline parallelism (refused: the factors are not
sharded), LoRA on the embeddings or the LM head, DoRA and the other PEFT
variants (refused at pack time, ``gatemix.adapter_folder``).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.sequence import IntermediateTensors

from gatemix.adapter_folder import read_adapter
from gatemix.engine.composite_folder import (
    BASE_SUBDIR,
    GATE_SUBDIR,
    LORA_PARALLEL_REFUSAL,
    adapter_dir,
    expert_module_key,
)
from gatemix.engine.composite_model import (
    CONTEXT_KEY,
    GatemixForCausalLM,
    build_expert,
    build_router_context,
)
from gatemix.engine.lora_layers import ExpertsAttention, install_lora
from gatemix.gate.artifact import read_router_form


@support_torch_compile(
    dynamic_arg_dims={"input_ids": 0, "positions": 0, "intermediate_tensors": 0, "inputs_embeds": 0}
)
class LoRAExpertEnsemble(nn.Module):
    """One base run for K LoRA experts (and the router's context model); one graph. ``(T,) -> (T, K*H [+ C])``."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        parallel = vllm_config.parallel_config
        if parallel.tensor_parallel_size > 1 or parallel.pipeline_parallel_size > 1:
            raise NotImplementedError(LORA_PARALLEL_REFUSAL)
        model_dir = Path(vllm_config.model_config.model)
        block = vllm_config.model_config.hf_config.gatemix
        self.keys = [expert_module_key(k) for k in range(len(block["expert_names"]))]
        self.base = build_expert(vllm_config, model_dir / BASE_SUBDIR, f"{prefix}.base")
        for layer in self.base.model.layers:
            layer.self_attn.attn = ExpertsAttention(layer.self_attn.attn, self.keys, vllm_config.cache_config)
        self.widths = [int(width) for width in block["expert_hidden_sizes"]]
        self.context = None
        form = read_router_form(model_dir / GATE_SUBDIR)
        if form.context_config is not None:
            self.context = build_router_context(vllm_config, form.context_config, f"{prefix}.{CONTEXT_KEY}")
            self.widths.append(form.context_config["hidden_size"])

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``(T,) -> (T, H [+ C])``: the base's embedding (shared by the experts), then the context model's."""
        embeds = [self.base.embed_input_ids(input_ids)]
        if self.context is not None:
            embeds.append(self.context.embed_input_ids(input_ids))
        return torch.cat(embeds, dim=-1)

    def make_empty_intermediate_tensors(
        self, batch_size: int, dtype: torch.dtype, device: torch.device
    ) -> IntermediateTensors:
        raise NotImplementedError(LORA_PARALLEL_REFUSAL)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        num_experts, num_tokens = len(self.keys), positions.shape[0]
        if inputs_embeds is None:
            base_embeds, context_embeds = self.base.embed_input_ids(input_ids), None
        else:
            base_embeds, *rest = inputs_embeds.split([self.widths[0], *self.widths[num_experts:]], dim=-1)
            context_embeds = rest[0] if rest else None
        # Expert k's copy of the T tokens is the k-th block of T rows.
        hidden = self.base(None, positions.repeat(num_experts), None, base_embeds.repeat(num_experts, 1))
        # (K*T, H) -> (T, K*H): the full composite's layout of K experts' hidden states.
        expert_hidden = hidden.view(num_experts, num_tokens, -1).transpose(0, 1).reshape(num_tokens, -1)
        if self.context is None:
            return expert_hidden
        return torch.cat([expert_hidden, self.context(input_ids, positions, None, context_embeds)], dim=-1)


class GatemixLoRAForCausalLM(GatemixForCausalLM):
    """The composite vLLM serves for a folder of LoRA experts (``gatemix.engine.lora_pack``)."""

    ensemble_class = LoRAExpertEnsemble

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.factor_dtype = vllm_config.model_config.dtype

    def _expert_logits(self, expert_hidden: torch.Tensor) -> torch.Tensor:
        """``(N, K*H)`` -> ``(N, K, V)``: one LM-head matmul over the K experts' rows."""
        num_rows = expert_hidden.shape[0]
        logits = self.ensemble.base.compute_logits(expert_hidden.reshape(num_rows * self.num_experts, -1))
        return logits.view(num_rows, self.num_experts, -1)

    def _expert_columns(self, expert: int, expert_hidden: torch.Tensor) -> torch.Tensor:
        """``(N, K*H)`` -> ``(N, H)``: expert k's hidden states."""
        width = self.expert_widths[expert]
        return expert_hidden[:, expert * width : (expert + 1) * width]

    def _expert_model(self, expert: int) -> nn.Module:
        """The shared base: every expert's LM head is the base's (adapters leave it alone)."""
        return self.ensemble.base

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """The base's own tensors (names unchanged) to its loader; then each expert's factors.

        The projections are wrapped once the base is loaded, as vLLM's LoRA
        manager wraps a loaded model, so the base's loader sees its own names.
        """
        names = self.ensemble.base.load_weights(weights)
        adapters = [read_adapter(adapter_dir(self.model_dir, k)).factors() for k in range(self.num_experts)]
        wrapped = set(install_lora(self.ensemble.base, adapters, self.factor_dtype))
        loaded = set()
        for name in names:
            module, _, parameter = name.rpartition(".")
            loaded.add(f"ensemble.base.{module}.base_layer.{parameter}" if module in wrapped else f"ensemble.base.{name}")
        return loaded | self._load_router()
