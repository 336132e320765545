"""GatemixForCausalLM: K experts of any vLLM decoder architecture and their router as one vLLM model.

Each expert is built from vLLM's own implementation of its architecture (the
class vLLM would serve it with alone, found in vLLM's model registry from the
expert's own ``config.json``), so its weight loading, tensor-parallel sharding
and quantization are vLLM's. Each engine step runs every expert over the same
token batch, sharing the scheduler, the paged KV cache and the sampler; then
``compute_logits`` returns the exact mixture

    log p(y | ctx) = logsumexp_k( log w_k(h_t) + log_softmax(z_k)(y) ),

where ``w(h_t)`` is the router applied to the experts' final hidden states at
that position. vLLM's sampler treats these log-probs as logits, so temperature,
top-p/top-k, penalties, logit bias, structured outputs and logprobs apply to the
mixture.

**Layer names.** vLLM binds each attention layer's KV cache by the layer's name
and reads one integer from it (``extract_layer_index``). Expert ``k`` lives under
``ensemble.experts.<key>`` with a digit-free key (``a``, ``b``, ..., ``aa``), so
its layers are ``ensemble.experts.b.model.layers.3.self_attn.attn``: unique
names whose one integer is the layer's own index, as in the stand-alone model.
Two layers sharing an index is allowed on the CUDA and CPU runners (as for
encoder-decoder models).

**One compiled graph.** ``ExpertEnsemble`` is the one ``@support_torch_compile``
module. The experts' own ``*Model`` classes carry that decorator too, but K
instances of one class share one code object and vLLM drops Dynamo's guards, so
a second instance could run the first one's graph; they are built with their
own compilation switched off and are traced inline into the ensemble's graph.

``forward`` returns, per token, the K hidden states and the token's log gate
weights (after per-request pins and restrictions). The weights travel with the
hidden state so that every later use of it (sampling, or prompt logprobs for
``echo`` scoring) mixes with the weights of that token's own request. They are
stored as a bf16/fp16-safe (high, low) pair so half-precision models keep
~16 bits of precision in the weights.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import nn
from transformers import LlamaConfig
from vllm.compilation import decorators
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig, set_current_vllm_config
from vllm.distributed import get_pp_group
from vllm.model_executor.model_loader.utils import get_model_architecture
from vllm.model_executor.models.interfaces import SupportsPP
from vllm.model_executor.models.llama import LlamaModel
from vllm.sequence import IntermediateTensors
from vllm.transformers_utils.config import get_config

from gatemix.engine.composite_folder import (
    COMPILE_MIXING_KEY,
    GATE_SUBDIR,
    expert_config_dir,
    expert_module_key,
)
from gatemix.engine.gate_versions import GateVersions, load_swappable
from gatemix.engine.head_logprobs import ExpertHeads
from gatemix.engine.mixing_step import MixingStep
from gatemix.engine.request_gates import (
    batch_layout_from_forward_context,
    query_start_loc_from_forward_context,
    token_rows,
    worker_gate_table,
)
from gatemix.engine.row_payload import (
    decode_log_weights,
    decode_token_index,
    encode_log_weights,
    encode_token_index,
)
from gatemix.gate.artifact import load_router, read_router_form
from gatemix.gate.mixing import mix_logprobs
from gatemix.gate.router import HiddenStateRouter, check_context_fits

logger = logging.getLogger(__name__)

CONTEXT_KEY = "context"  # the router's own causal Llama, beside the experts


@contextlib.contextmanager
def experts_compiled_inline() -> Iterator[None]:
    """Build vLLM models whose ``@support_torch_compile`` does not compile them by itself.

    Contract with vLLM 0.32's ``vllm.compilation.decorators``: the decorator's
    ``__init__`` consults ``_should_ignore_torch_compile(cls)`` once, at
    construction; ``tests/engine/test_vllm_contracts.py`` checks it.
    """
    original = decorators._should_ignore_torch_compile
    decorators._should_ignore_torch_compile = lambda cls: True
    try:
        yield
    finally:
        decorators._should_ignore_torch_compile = original


def build_expert(vllm_config: VllmConfig, expert_dir: Path, prefix: str) -> nn.Module:
    """Expert from vLLM's own class for its architecture, configured from its own config.json."""
    model_config = vllm_config.model_config
    hf_config = get_config(str(expert_dir), trust_remote_code=model_config.trust_remote_code)
    expert_vllm_config = vllm_config.with_hf_config(hf_config)
    model_class, _ = get_model_architecture(expert_vllm_config.model_config)
    with set_current_vllm_config(expert_vllm_config, prefix=prefix), experts_compiled_inline():
        return model_class(vllm_config=expert_vllm_config, prefix=prefix)


def build_router_context(vllm_config: VllmConfig, context_config: dict, prefix: str) -> nn.Module:
    """The router's own causal Llama as vLLM's ``LlamaModel`` (attention in the paged KV cache)."""
    context_vllm_config = vllm_config.with_hf_config(
        LlamaConfig(**context_config), architectures=["LlamaForCausalLM"]
    )
    with set_current_vllm_config(context_vllm_config, prefix=prefix), experts_compiled_inline():
        return LlamaModel(vllm_config=context_vllm_config, prefix=prefix)


@support_torch_compile(
    dynamic_arg_dims={"input_ids": 0, "positions": 0, "intermediate_tensors": 0, "inputs_embeds": 0}
)
class ExpertEnsemble(nn.Module):
    """All K experts (and the router's context model); one graph. ``(T,) -> (T, sum_k H_k [+ C])``.

    Between pipeline ranks each expert's hidden states and residuals travel
    under its own key (``"<key>.hidden_states"``), since the experts' widths
    may differ.
    """

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        model_dir = Path(vllm_config.model_config.model)
        block = vllm_config.model_config.hf_config.gatemix
        self.keys = [expert_module_key(k) for k in range(len(block["expert_names"]))]
        self.experts = nn.ModuleDict(
            {
                key: build_expert(vllm_config, expert_config_dir(model_dir, k), f"{prefix}.experts.{key}")
                for k, key in enumerate(self.keys)
            }
        )
        self.widths = [int(width) for width in block["expert_hidden_sizes"]]
        self.context = None
        form = read_router_form(model_dir / GATE_SUBDIR)
        if form.context_config is not None:
            if get_pp_group().world_size > 1:
                raise NotImplementedError(
                    "a router with its own context model does not run under pipeline parallelism yet"
                )
            self.context = build_router_context(vllm_config, form.context_config, f"{prefix}.{CONTEXT_KEY}")
            self.widths.append(form.context_config["hidden_size"])

    def stacks(self) -> list[tuple[str, nn.Module]]:
        """(key, module) of every model run on the tokens: the experts, then the context model."""
        return [*self.experts.items(), *([(CONTEXT_KEY, self.context)] if self.context is not None else [])]

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return torch.cat([stack.embed_input_ids(input_ids) for _, stack in self.stacks()], dim=-1)

    def make_empty_intermediate_tensors(
        self, batch_size: int, dtype: torch.dtype, device: torch.device
    ) -> IntermediateTensors:
        tensors = {}
        for key, expert in self.experts.items():
            for name, tensor in expert.make_empty_intermediate_tensors(batch_size, dtype, device).items():
                tensors[f"{key}.{name}"] = tensor
        return IntermediateTensors(tensors)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        embeds = [None] * len(self.widths)
        if inputs_embeds is not None:
            embeds = list(inputs_embeds.split(self.widths, dim=-1))
        outputs = []
        for (key, stack), stack_embeds in zip(self.stacks(), embeds):
            stack_intermediate = None
            if intermediate_tensors is not None:
                stack_intermediate = IntermediateTensors(
                    {
                        name.removeprefix(f"{key}."): tensor
                        for name, tensor in intermediate_tensors.tensors.items()
                        if name.startswith(f"{key}.")
                    }
                )
            outputs.append(stack(input_ids, positions, stack_intermediate, stack_embeds))
        if not get_pp_group().is_last_rank:
            return IntermediateTensors(
                {
                    f"{key}.{name}": tensor
                    for (key, _), output in zip(self.stacks(), outputs)
                    for name, tensor in output.tensors.items()
                }
            )
        # (T, sum_k H_k) expert states, then the context model's (T, C) when the router has one.
        return torch.cat(outputs, dim=-1)


class GatemixForCausalLM(nn.Module, SupportsPP):
    """The composite model vLLM serves for a gatemix folder (see module docstring)."""

    ensemble_class: type[nn.Module] = ExpertEnsemble  # the LoRA composite runs its own (lora_composite_model)

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.model_dir = Path(vllm_config.model_config.model)
        self.expert_names = list(config.gatemix["expert_names"])
        self.num_experts = len(self.expert_names)
        self.ensemble = self.ensemble_class(vllm_config=vllm_config, prefix="ensemble")
        self.expert_widths = self.ensemble.widths[: self.num_experts]
        form = read_router_form(self.model_dir / GATE_SUBDIR)
        if form.expert_widths != tuple(self.expert_widths):
            raise ValueError(f"router reads hidden sizes {form.expert_widths}, experts have {self.expert_widths}")
        check_context_fits(form.context_config, config.to_dict())
        # The head only: a context model, if the router has one, runs in the ensemble.
        self.router = HiddenStateRouter(form, build_context=False)
        self.gates = GateVersions(self.router, config.gatemix["gate_version"])
        self.expert_hashes = dict(config.gatemix["expert_hashes"])
        additional_config = vllm_config.additional_config
        self.mix = MixingStep(
            compiled=isinstance(additional_config, dict) and bool(additional_config.get(COMPILE_MIXING_KEY))
        )
        self.gate_table = worker_gate_table()
        self.gate_table.prefix_states.current_gate_version = self.gates.current
        cache_config = vllm_config.cache_config
        if cache_config.enable_prefix_caching:
            self.gate_table.prefix_states.configure_caching(cache_config.block_size, lambda: cache_config.num_gpu_blocks)
        # The posterior state's log-prob of each prompt token, per expert (engine/head_logprobs.py).
        self.expert_heads = ExpertHeads(
            self.num_experts, vllm_config.model_config.get_vocab_size(), self._expert_columns, self._expert_model
        )
        self.with_draft = vllm_config.speculative_config is not None  # engine/spec_decode.py
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
        expert_hidden = router_inputs[:, : sum(self.expert_widths)]
        state = self._posterior_states(input_ids, positions, expert_hidden) if self.gates.any_posterior else None
        num_tokens, device = expert_hidden.shape[0], expert_hidden.device
        query_start_loc = query_start_loc_from_forward_context()
        self.gate_table.forward_batch = None if query_start_loc is None else (query_start_loc, input_ids, positions)
        rows = token_rows(query_start_loc, num_tokens, device)
        log_weights = self._gate(router_inputs.float(), state, rows)  # (T, K) float32
        log_weights = self.gate_table.apply_overrides(log_weights, rows)
        payload = encode_log_weights(log_weights, expert_hidden.dtype)  # 2 x (T, K)
        if self.with_draft:  # several sampled rows per request: each says which token it is
            payload = (*payload, encode_token_index(num_tokens, expert_hidden.dtype, device))
        return torch.cat([expert_hidden, *payload], dim=-1)  # (T, sum_k H_k + 2K [+ TOKEN_INDEX_DIGITS])

    def _gate(self, features: torch.Tensor, state: torch.Tensor | None, rows: torch.Tensor | None) -> torch.Tensor:
        """Each token's log weights from the gate its request joined with (one head, almost always)."""
        if len(self.gates.heads) == 1 or rows is None:
            return self.gates.router.gate(features, state)
        prefix_states = self.gate_table.prefix_states
        row_versions = [prefix_states.version_of(row) for row in rows.tolist()]
        self.gates.retire(set(row_versions) | {s.gate_version for s in prefix_states.rows.values()})
        log_weights = features.new_empty(features.shape[0], self.num_experts)
        for version in set(row_versions):
            mask = torch.tensor([v == version for v in row_versions], device=features.device)
            log_weights[mask] = self.gates.head(version).gate(
                features[mask], None if state is None else state[mask]
            )
        return log_weights

    def load_gate(self, artifact_dir: str, in_flight: list[str] = ()) -> dict:
        """Swap in a new gate between engine steps; requests in flight keep theirs (``gate_versions``).

        ``in_flight``: the gate versions the server's unfinished requests name.
        """
        artifact = load_swappable(
            artifact_dir, expert_names=self.expert_names, expert_hashes=self.expert_hashes,
            expert_widths=tuple(self.expert_widths), current=self.gates.router,
        )
        self.gates.add(artifact, self.router.proj_out.weight.device, set(in_flight))
        self.gate_table.prefix_states.current_gate_version = artifact.version
        self.gates.retire({s.gate_version for s in self.gate_table.prefix_states.rows.values()})
        logger.info("gatemix gate %s (%s) now serves new requests", artifact.version, artifact.method)
        return {"version": artifact.version, "method": artifact.method}

    def _expert_logits(self, expert_hidden: torch.Tensor) -> torch.Tensor | None:
        """``(N, sum_k H_k)`` -> ``(N, K, V)``, or None on a TP rank that receives no logits."""
        per_expert = [self.expert_heads.logits_of(k, expert_hidden) for k in range(self.num_experts)]
        return None if per_expert[0] is None else torch.stack(per_expert, dim=1)

    def _expert_columns(self, expert: int, expert_hidden: torch.Tensor) -> torch.Tensor:
        """``(N, sum_k H_k)`` -> ``(N, H_k)``: expert k's hidden states."""
        start = sum(self.expert_widths[:expert])
        return expert_hidden[:, start : start + self.expert_widths[expert]]

    def _expert_model(self, expert: int) -> nn.Module:
        """Expert k's vLLM model: its LM head and ``compute_logits``."""
        return self.ensemble.experts[self.ensemble.keys[expert]]

    def _posterior_states(self, input_ids, positions, expert_hidden: torch.Tensor) -> torch.Tensor:
        """``(T, K)`` posterior state of every token (``engine/prefix_state.py``)."""
        if input_ids is None:
            raise ValueError("a posterior gate reads the token ids; prompt embeddings are not supported")

        layout = batch_layout_from_forward_context()
        if layout is None:  # vLLM's profiling run: the log-prob gather at its largest, so it is counted
            self.expert_heads.exercise_worst_case(expert_hidden, input_ids)
        prefix_states, no_forgetting = self.gate_table.prefix_states, torch.tensor(1.0)

        def forgetting_of_row(row: int) -> torch.Tensor:
            head = self.gates.head(prefix_states.version_of(row))
            return head.forgetting.detach() if head.form.posterior else no_forgetting

        return prefix_states.token_states(
            input_ids, positions, layout, self.expert_heads, forgetting_of_row, expert_hidden, self.num_experts,
        )

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """``(N, sum_k H_k + 2K [+ TOKEN_INDEX_DIGITS])`` -> ``(N, V)`` mixture log-probs, float32."""
        split, num_experts = sum(self.expert_widths), self.num_experts
        log_weights = decode_log_weights(hidden_states[:, split : split + 2 * num_experts], num_experts)  # (N, K)
        expert_logits = self._expert_logits(hidden_states[:, :split])  # (N, K, V)
        if expert_logits is None:  # tensor-parallel rank that does not receive the gathered logits
            return None
        token_index = decode_token_index(hidden_states[:, split + 2 * num_experts :]) if self.with_draft else None
        sampled = self.gate_table.note_sampling_call(log_weights, token_index)
        if self.gates.any_posterior:
            # The sampling call's log-probs are the next step's first-token log-probs.
            expert_logprobs = torch.log_softmax(expert_logits.float(), dim=-1)
            self.gate_table.prefix_states.store_sampled(expert_logprobs, sampled)
            return mix_logprobs(expert_logprobs, log_weights)
        return self.mix(expert_logits, log_weights)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Checkpoint names ``experts.{k}.<hf name>``, streamed to expert k's own ``load_weights``.

        The composite's files hold one expert each, so consecutive runs of one
        expert's tensors go to its loader as they come, without holding every
        expert's weights in memory at once.
        """
        loaded: set[str] = set()
        by_expert = itertools.groupby(weights, key=lambda item: int(item[0].split(".", 2)[1]))
        for index, run in by_expert:
            key = self.ensemble.keys[index]
            names = self.ensemble.experts[key].load_weights(
                (name.split(".", 2)[2], tensor) for name, tensor in run
            )
            loaded |= {f"ensemble.experts.{key}.{name}" for name in names}
        return loaded | self._load_router()

    def _load_router(self) -> set[str]:
        artifact = load_router(self.model_dir / GATE_SUBDIR)
        if artifact.expert_names != self.expert_names:
            raise ValueError(f"gate was fitted for {artifact.expert_names}, composite holds {self.expert_names}")
        head = {k: v for k, v in artifact.router.state_dict().items() if not k.startswith("context.")}
        self.router.load_state_dict(head, strict=True)
        self.router.float()
        loaded = {f"router.{name}" for name, _ in self.router.named_parameters()}
        if self.ensemble.context is not None:
            names = self.ensemble.context.load_weights(artifact.router.context_weights().items())
            loaded |= {f"ensemble.{CONTEXT_KEY}.{name}" for name in names}
        logger.info("gatemix router %s (%s) loaded for %s", artifact.version, artifact.method, self.expert_names)
        return loaded
