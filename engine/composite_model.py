"""GatemixForCausalLM: K Llama experts and their router as one vLLM model.

Each engine step runs every expert over the same token batch (one forward pass
per expert, sharing the scheduler, the paged KV cache and the sampler), then
``compute_logits`` returns the exact mixture

    log p(y | ctx) = logsumexp_k( log w_k(h_t) + log_softmax(z_k)(y) ),

where ``w(h_t)`` is the router applied to the experts' final hidden states at
that position. vLLM's sampler then treats these log-probs as logits, so
temperature, top-p/top-k, penalties and logprobs apply to the mixture.

``forward`` returns, per token, the K hidden states and the token's log gate
weights (after per-request pins and restrictions). The weights travel with the
hidden state so that every later use of it (sampling, or prompt logprobs for
``echo`` scoring) mixes with the weights of that token's own request. They are
stored as a bf16/fp16-safe (high, low) pair so half-precision models keep
~16 bits of precision in the weights.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.distributed import get_pp_group
from vllm.distributed.utils import get_pp_indices
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.interfaces import SupportsPP
from vllm.model_executor.models.llama import LlamaDecoderLayer
from vllm.model_executor.models.utils import PPMissingLayer, make_empty_intermediate_tensors_factory
from vllm.sequence import IntermediateTensors

from gatemix.engine.composite_folder import GATE_SUBDIR
from gatemix.engine.request_gates import token_rows_from_forward_context, worker_gate_table
from gatemix.gate.artifact import load_router, read_router_form
from gatemix.gate.mixing import mix_logits, mix_logits_two_pass
from gatemix.gate.router import HiddenStateRouter, check_context_fits

logger = logging.getLogger(__name__)

# HF checkpoint names -> vLLM's fused parameters (param suffix, checkpoint suffix, shard).
STACKED_PARAMS = (
    (".qkv_proj", ".q_proj", "q"),
    (".qkv_proj", ".k_proj", "k"),
    (".qkv_proj", ".v_proj", "v"),
    (".gate_up_proj", ".gate_proj", 0),
    (".gate_up_proj", ".up_proj", 1),
)
# Attention layers are named "gatemix.layers.{k * L + i}": vLLM binds KV caches
# by the single integer in each attention layer's name, so it must be unique.
ATTENTION_PREFIX = "gatemix.layers"
LOG_WEIGHT_FLOOR = -1e4  # stands in for log 0; exp() of it is exactly 0 in float32


class ExpertStack(nn.Module):
    """One Llama expert: embeddings, decoder layers, final norm and LM head.

    Under pipeline parallelism each rank holds the same slice of every expert's
    layers, the first rank the embeddings, the last the norm and LM head. The
    router's own context model is the same stack without an LM head, built
    from its own (smaller) config; its attention layers are numbered after the
    experts'.
    """

    def __init__(
        self,
        vllm_config: VllmConfig,
        layer_offset: int,
        config=None,
        with_lm_head: bool = True,
    ) -> None:
        super().__init__()
        config = config or vllm_config.model_config.hf_config
        quant_config = vllm_config.quant_config
        pp_group = get_pp_group()
        num_layers = config.num_hidden_layers
        self.start_layer, self.end_layer = get_pp_indices(num_layers, pp_group.rank_in_group, pp_group.world_size)
        self.embed_tokens = (
            VocabParallelEmbedding(config.vocab_size, config.hidden_size, quant_config=quant_config)
            if pp_group.is_first_rank or (config.tie_word_embeddings and pp_group.is_last_rank)
            else PPMissingLayer()
        )
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(
                vllm_config=vllm_config,
                prefix=f"{ATTENTION_PREFIX}.{layer_offset + layer_index}",
                config=config,
            )
            if self.start_layer <= layer_index < self.end_layer
            else PPMissingLayer()
            for layer_index in range(num_layers)
        )
        if pp_group.is_last_rank:
            self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            self.lm_head = PPMissingLayer()
            if with_lm_head:
                self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, quant_config=quant_config)
                if config.tie_word_embeddings:
                    self.lm_head = self.lm_head.tie_weights(self.embed_tokens)
        else:
            self.norm, self.lm_head = PPMissingLayer(), PPMissingLayer()

    def forward(
        self, hidden_states: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This rank's layers; on the last rank also the final norm. ``(T, H)`` each."""
        for layer in self.layers[self.start_layer : self.end_layer]:
            hidden_states, residual = layer(positions, hidden_states, residual)
        if get_pp_group().is_last_rank:
            hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states, residual

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], tied: bool) -> set[str]:
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            name = name.removeprefix("model.")
            if "rotary_emb.inv_freq" in name or (tied and name == "lm_head.weight"):
                continue
            for param_suffix, checkpoint_suffix, shard in STACKED_PARAMS:
                if checkpoint_suffix in name:
                    name = name.replace(checkpoint_suffix, param_suffix)
                    if name in params:  # absent: another pipeline rank's layer
                        params[name].weight_loader(params[name], tensor, shard)
                    break
            else:
                if name not in params:
                    continue
                param = params[name]
                getattr(param, "weight_loader", default_weight_loader)(param, tensor)
            loaded.add(name)
        if tied and "lm_head.weight" in params:
            loaded.add("lm_head.weight")
        return loaded


@support_torch_compile(
    dynamic_arg_dims={"input_ids": 0, "positions": 0, "inputs_embeds": 0}
)
class ExpertEnsemble(nn.Module):
    """All K expert stacks; compiled as one graph. ``(T,) -> (T, K*H)``.

    Between pipeline ranks the K hidden states and residuals travel
    concatenated, as ``(T, K*H)`` intermediate tensors.
    """

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        num_experts = len(config.gatemix["expert_names"])
        num_layers = config.num_hidden_layers
        self.experts = nn.ModuleList(
            ExpertStack(vllm_config, k * num_layers) for k in range(num_experts)
        )
        context_config = router_context_config(vllm_config)
        self.context = (
            None
            if context_config is None
            else ExpertStack(vllm_config, num_experts * num_layers, context_config, with_lm_head=False)
        )
        self.widths = [config.hidden_size] * num_experts + (
            [context_config.hidden_size] if context_config is not None else []
        )
        self.make_empty_intermediate_tensors = make_empty_intermediate_tensors_factory(
            ["hidden_states", "residual"], num_experts * config.hidden_size
        )

    def stacks(self) -> list[ExpertStack]:
        return [*self.experts, *([self.context] if self.context is not None else [])]

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return torch.cat([stack.embed_tokens(input_ids) for stack in self.stacks()], dim=-1)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        num_experts = len(self.experts)
        if get_pp_group().is_first_rank:
            if inputs_embeds is None:
                inputs_embeds = self.embed_input_ids(input_ids)
            hidden = inputs_embeds.split(self.widths, dim=-1)
            residual = [None] * len(self.widths)
        else:
            hidden = intermediate_tensors["hidden_states"].chunk(num_experts, dim=-1)
            residual = intermediate_tensors["residual"].chunk(num_experts, dim=-1)
        outputs = [stack(h, r, positions) for stack, h, r in zip(self.stacks(), hidden, residual)]
        # (T, K*H) expert states, then the context model's (T, C) when the router has one.
        hidden_states = torch.cat([h for h, _ in outputs], dim=-1)
        if not get_pp_group().is_last_rank:
            residuals = torch.cat([r for _, r in outputs], dim=-1)
            return IntermediateTensors({"hidden_states": hidden_states, "residual": residuals})
        return hidden_states


class GatemixForCausalLM(nn.Module, SupportsPP):
    """The composite model vLLM serves for a gatemix folder (see module docstring)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.model_dir = Path(vllm_config.model_config.model)
        self.expert_names = list(config.gatemix["expert_names"])
        self.num_experts = len(self.expert_names)
        self.hidden_size = config.hidden_size
        self.tied = bool(config.tie_word_embeddings)
        self.ensemble = ExpertEnsemble(vllm_config=vllm_config, prefix=prefix)
        # The head only: a context model, if the router has one, runs in the ensemble.
        self.router = HiddenStateRouter(read_router_form(self.model_dir / GATE_SUBDIR), build_context=False)
        self.logits_processor = LogitsProcessor(config.vocab_size)
        self.mix = MixingStep()
        self.gate_table = worker_gate_table()
        self.make_empty_intermediate_tensors = self.ensemble.make_empty_intermediate_tensors

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.ensemble.embed_input_ids(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor | IntermediateTensors:
        router_inputs = self.ensemble(input_ids, positions, intermediate_tensors, inputs_embeds)
        if not get_pp_group().is_last_rank:
            return router_inputs  # IntermediateTensors for the next pipeline stage
        expert_hidden = router_inputs[:, : self.num_experts * self.hidden_size]
        log_weights = self.router.head(router_inputs.float())  # (T, K) float32
        token_rows = token_rows_from_forward_context(expert_hidden.shape[0], expert_hidden.device)
        log_weights = self.gate_table.apply_overrides(log_weights, token_rows)
        return torch.cat([expert_hidden, *encode_log_weights(log_weights, expert_hidden.dtype)], dim=-1)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """``(N, K*H + 2K)`` -> ``(N, V)`` mixture log-probs, float32."""
        num_experts, hidden_size = self.num_experts, self.hidden_size
        split = num_experts * hidden_size
        log_weights = decode_log_weights(hidden_states[:, split:], num_experts)  # (N, K)
        expert_hidden = hidden_states[:, :split].view(-1, num_experts, hidden_size)
        per_expert = [
            self.logits_processor(expert.lm_head, expert_hidden[:, k])
            for k, expert in enumerate(self.ensemble.experts)
        ]
        if per_expert[0] is None:  # tensor-parallel rank that does not receive the gathered logits
            return None
        expert_logits = torch.stack(per_expert, dim=1)  # (N, K, V)
        self.gate_table.last_sample_log_weights = log_weights
        return self.mix(expert_logits, log_weights)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        per_expert: list[list[tuple[str, torch.Tensor]]] = [[] for _ in range(self.num_experts)]
        for name, tensor in weights:
            _, index, rest = name.split(".", 2)  # "experts.{k}.<hf name>"
            per_expert[int(index)].append((rest, tensor))
        loaded: set[str] = set()
        for k, expert in enumerate(self.ensemble.experts):
            names = expert.load_weights(per_expert[k], tied=self.tied)
            loaded |= {f"ensemble.experts.{k}.{name}" for name in names}
        loaded |= self._load_router()
        return loaded

    def _load_router(self) -> set[str]:
        artifact = load_router(self.model_dir / GATE_SUBDIR)
        if artifact.expert_names != self.expert_names:
            raise ValueError(f"gate was fitted for {artifact.expert_names}, composite holds {self.expert_names}")
        head = {k: v for k, v in artifact.router.state_dict().items() if not k.startswith("context.")}
        self.router.load_state_dict(head, strict=True)
        self.router.float()
        loaded = {f"router.{name}" for name, _ in self.router.named_parameters()}
        if self.ensemble.context is not None:
            names = self.ensemble.context.load_weights(artifact.router.context_weights().items(), tied=False)
            loaded |= {f"ensemble.context.{name}" for name in names}
        logger.info("gatemix router %s (%s) loaded for %s", artifact.version, artifact.method, self.expert_names)
        return loaded


class MixingStep:
    """The mixing step: two-pass eager by default, the fused form compiled on request.

    ``gatemix bench mixing`` on CPU: in eager PyTorch the fused form (no K x V
    log-softmax) is no faster than log-softmax-then-mix, and 2.3x slower at a
    128k vocabulary (``logsumexp`` is several kernels, ``log_softmax`` one), so
    eager mixing stays two-pass. Compiled (``GATEMIX_COMPILE_MIXING=1``), the
    fused form ran 2-9x faster than two-pass, but end to end it changed nothing
    measurable on the demo (``gatemix bench engine``: 0.87-0.98x), where mixing
    is a small part of a step; so it is opt-in. It compiles on the first call
    (vLLM's warm-up run) and falls back to eager, logging once, if compiling
    fails (no C++ compiler or Triton).
    """

    def __init__(self) -> None:
        enabled = os.environ.get("GATEMIX_COMPILE_MIXING", "0") == "1"
        self.compiled = torch.compile(mix_logits, dynamic=True) if enabled else None

    def __call__(self, expert_logits: torch.Tensor, log_weights: torch.Tensor) -> torch.Tensor:
        if self.compiled is not None:
            try:
                return self.compiled(expert_logits, log_weights)
            except Exception as exc:  # inductor needs a C++ compiler (CPU) or Triton (GPU)
                logger.warning("compiled mixing failed (%s); mixing eagerly from now on", exc)
                self.compiled = None
        return mix_logits_two_pass(expert_logits, log_weights)


def router_context_config(vllm_config: VllmConfig):
    """The router's own Llama config, from the composite's gate artifact, or None.

    It must share the experts' attention shape (one KV-cache layout for every
    layer) and cannot be split into pipeline stages yet.
    """
    from transformers import LlamaConfig

    model_dir = Path(vllm_config.model_config.model)
    form = read_router_form(model_dir / GATE_SUBDIR)
    if form.context_config is None:
        return None
    check_context_fits(form.context_config, vllm_config.model_config.hf_config.to_dict())
    if get_pp_group().world_size > 1:
        raise NotImplementedError("a router with its own context model does not run under pipeline parallelism yet")
    return LlamaConfig(**form.context_config)


def encode_log_weights(log_weights: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(T, K)`` float32 -> (high, low) in ``dtype``, with ``high + low`` ~ the input."""
    log_weights = log_weights.float().clamp_min(LOG_WEIGHT_FLOOR)
    high = log_weights.to(dtype)
    low = (log_weights - high.float()).to(dtype)
    return high, low


def decode_log_weights(packed: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Inverse of ``encode_log_weights``: ``(N, 2K)`` -> ``(N, K)`` float32."""
    return packed[:, :num_experts].float() + packed[:, num_experts:].float()
