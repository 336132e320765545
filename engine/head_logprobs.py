"""Each expert's log-prob of a given next token, from its LM head, never a tokens x vocabulary tensor.

The posterior state (``engine/prefix_state.py``) needs ``log pi_k(x_{t+1} | x_<=t)``
at every prompt token: one number per token and expert, but each one's
normaliser spans the whole vocabulary, so a posterior composite runs every
expert's head over the whole prompt. Two ways, both bounded in memory:

* **A plain head** (``plain_head_weight``: unquantized, not sharded across
  tensor-parallel ranks, no logit scale or soft cap, its logits equal to the
  expert's ``compute_logits`` on a probe) is applied in tiles of rows x
  vocabulary (``tiled_target_logprobs``). A tile is small enough to stay in
  cache while its log-sum-exp is taken, where a whole row of logits is not; on
  CPU that halves the head's time against the chunked path below. The tiles'
  log-sum-exps are combined in float64 and the target's logit is one dot
  product per row.
* **Any other head** goes through the expert's own ``compute_logits`` (its
  quantized matmul, tensor-parallel gather and scaling) a chunk of rows at a
  time (``chunked_target_logprobs``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional

logger = logging.getLogger(__name__)

# Most logits (rows x V, one expert at a time) the chunked gather holds at once: 32 MiB of fp32, as
# much again for their log-softmax.
TARGET_CHUNK_ELEMENTS = 1 << 23
# A plain head's tile: rows x vocabulary entries, 16 MiB of fp32 logits (half the chunk bound).
HEAD_TILE_ROWS = 2048
HEAD_TILE_VOCAB = 2048
# A plain head's logits may differ from compute_logits' by the matmuls' rounding, no more: relative
# to the largest logit of the probe (a scale or soft cap the structure did not show is far larger).
PROBE_ROWS = 4
PROBE_TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def target_chunk_rows(vocab_size: int, max_elements: int = TARGET_CHUNK_ELEMENTS) -> int:
    return max(1, max_elements // vocab_size)


def chunked_target_logprobs(
    logits_of: Callable[[torch.Tensor], torch.Tensor | None],
    hidden: torch.Tensor,
    targets: torch.Tensor,
    chunk_rows: int,
) -> torch.Tensor | None:
    """``(M, ...)`` hidden states, ``(M,)`` next tokens -> ``(M,)`` one expert's ``log pi(target | ctx)``.

    ``logits_of(rows)``: ``(m, ...) -> (m, V)``, the expert's logits (None on a
    tensor-parallel rank without logits). At most ``chunk_rows`` rows of logits
    exist at once, so prefill memory does not grow with tokens x vocabulary.
    """
    pieces = []
    for start in range(0, hidden.shape[0], chunk_rows):
        logits = logits_of(hidden[start : start + chunk_rows])  # (m, V)
        if logits is None:
            return None
        # log_softmax is one fused kernel on CPU, where logsumexp is several.
        pieces.append(torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[start : start + chunk_rows, None]))
        del logits
    return torch.cat(pieces)[:, 0] if pieces else None


def tiled_target_logprobs(
    weight: torch.Tensor,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    tile_rows: int = HEAD_TILE_ROWS,
    tile_vocab: int = HEAD_TILE_VOCAB,
) -> torch.Tensor:
    """``(V, H)`` plain head, ``(M, H)`` hidden, ``(M,)`` targets -> ``(M,)`` float32 ``log softmax(h W^T)[target]``.

    At most ``tile_rows x tile_vocab`` logits exist at once, in one buffer that
    every tile reuses (in place: a fresh tile each time would leave the host
    allocator's heap fragmented, more memory than the tiles themselves).
    """
    out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    in_place = weight.dtype == torch.float32  # else each tile's logits are cast to float32, a copy
    buffer = torch.empty(min(tile_rows, hidden.shape[0]) * tile_vocab if in_place else 0, device=hidden.device)
    for start in range(0, hidden.shape[0], tile_rows):
        rows = hidden[start : start + tile_rows]  # (m, H)
        tiles = []
        for first in range(0, weight.shape[0], tile_vocab):
            weight_tile = weight[first : first + tile_vocab]  # (v, H)
            if in_place:
                logits = buffer[: rows.shape[0] * weight_tile.shape[0]].view(rows.shape[0], -1)
                torch.mm(rows, weight_tile.T, out=logits)  # (m, v)
            else:
                logits = functional.linear(rows, weight_tile).float()
            tiles.append(_log_sum_exp_in_place(logits))
        log_normaliser = torch.logsumexp(torch.stack(tiles, dim=-1).double(), dim=-1)  # (m,)
        target_logits = (rows.float() * weight[targets[start : start + tile_rows]].float()).sum(-1)  # (m,)
        out[start : start + tile_rows] = (target_logits.double() - log_normaliser).float()
    return out


def _log_sum_exp_in_place(logits: torch.Tensor) -> torch.Tensor:
    """``(m, v)`` -> ``(m,)`` log-sum-exp of each row; ``logits`` is overwritten."""
    maxes = logits.amax(dim=-1, keepdim=True)  # (m, 1)
    return logits.sub_(maxes).exp_().sum(dim=-1).log_().add_(maxes[:, 0])


def plain_head_weight(model: nn.Module) -> torch.Tensor | None:
    """``(V, H)`` the weight of ``model``'s LM head if its logits are ``hidden @ weight.T``, else None.

    ``model``: a vLLM causal LM with ``lm_head`` and ``logits_processor``
    (``tests/engine/test_vllm_contracts.py`` holds what this reads); the
    vocabulary's padding rows are cut.
    """
    # vllm: deferred, unit tests of the math import this module without an engine
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

    head, processor = getattr(model, "lm_head", None), getattr(model, "logits_processor", None)
    if head is None or processor is None or not isinstance(getattr(head, "quant_method", None), UnquantizedEmbeddingMethod):
        return None
    if getattr(head, "tp_size", 1) != 1 or getattr(head, "bias", None) is not None:
        return None
    if processor.logits_as_input or processor.soft_cap is not None or processor.scale != 1.0:
        return None
    weight = getattr(head, "weight", None)
    if weight is None or weight.dim() != 2 or weight.is_meta or processor.head_dtype not in (None, weight.dtype):
        return None
    return weight[: processor.org_vocab_size]


def agrees_with_compute_logits(weight: torch.Tensor, model: nn.Module, hidden: torch.Tensor) -> bool:
    """Whether ``hidden @ weight.T`` is ``model.compute_logits(hidden)`` on a few rows (a head
    the structural check passed, but whose model adds to the logits outside its processor, fails)."""
    probe = hidden[:PROBE_ROWS]
    expected = model.compute_logits(probe)
    if expected is None or expected.shape != (probe.shape[0], weight.shape[0]):
        return False
    got = functional.linear(probe, weight).float()
    scale = 1.0 + expected.float().abs().max().item()
    return bool(((got - expected.float()).abs().max() <= PROBE_TOLERANCE.get(weight.dtype, 2e-2) * scale).item())


class ExpertHeads:
    """Every expert's log-prob of the targets: the tiled path for a plain head, the chunked one else.

    ``hidden_of(k, hidden)``: expert k's columns of the composite's ``(M, sum_k H_k)``
    hidden states; ``model_of(k)``: expert k's vLLM model (its head and
    ``compute_logits``). Which heads are plain is decided on the first call
    with rows (the weights are loaded by then: vLLM's profiling run makes it).
    """

    def __init__(
        self,
        num_experts: int,
        vocab_size: int,
        hidden_of: Callable[[int, torch.Tensor], torch.Tensor],
        model_of: Callable[[int], nn.Module],
    ) -> None:
        self.num_experts, self.hidden_of, self.model_of = num_experts, hidden_of, model_of
        self.chunk_rows = target_chunk_rows(vocab_size)
        self.plain_weights: list[torch.Tensor | None] | None = None  # per expert, once decided

    def __call__(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
        """``(M, sum_k H_k)``, ``(M,)`` -> ``(M, K)`` float32, or None on a tensor-parallel rank without logits."""
        if hidden.shape[0] == 0:
            return hidden.new_zeros(0, self.num_experts, dtype=torch.float32)
        self._decide(hidden)
        columns = []
        for expert, weight in enumerate(self.plain_weights):
            if weight is not None:
                columns.append(tiled_target_logprobs(weight, self.hidden_of(expert, hidden), targets)[:, None])
                continue
            column = chunked_target_logprobs(
                lambda rows, expert=expert: self.logits_of(expert, rows), hidden, targets, self.chunk_rows
            )
            if column is None:
                return None
            columns.append(column[:, None])
        return torch.cat(columns, dim=-1)

    def exercise_worst_case(self, hidden: torch.Tensor, targets: torch.Tensor) -> None:
        """The gather on as many rows as need the most memory at once: what vLLM's profiling run
        must see, so that the KV cache is sized with it counted."""
        self._decide(hidden)
        tiled = any(weight is not None for weight in self.plain_weights or ())
        rows = max(self.chunk_rows, HEAD_TILE_ROWS if tiled else 0)
        self(hidden[:rows], targets[:rows])

    def _decide(self, hidden: torch.Tensor) -> None:
        """Which experts' heads are plain, once, from the first rows seen."""
        if self.plain_weights is None and hidden.shape[0] > 0:
            self.plain_weights = [self._plain_weight(k, hidden) for k in range(self.num_experts)]
            tiled = [k for k, weight in enumerate(self.plain_weights) if weight is not None]
            logger.info("gatemix posterior state: prompt log-probs of experts %s in tiles, of %s through "
                        "compute_logits", tiled, [k for k in range(self.num_experts) if k not in tiled])

    def _plain_weight(self, expert: int, hidden: torch.Tensor) -> torch.Tensor | None:
        model = self.model_of(expert)
        weight = plain_head_weight(model)
        if weight is None or not agrees_with_compute_logits(weight, model, self.hidden_of(expert, hidden)):
            return None
        return weight

    def logits_of(self, expert: int, hidden: torch.Tensor) -> torch.Tensor | None:
        """``(N, sum_k H_k)`` -> ``(N, V)`` expert k's logits, or None on a TP rank that receives none:
        the expert's own ``compute_logits`` (its LM head, tensor-parallel gather and any scaling)."""
        return self.model_of(expert).compute_logits(self.hidden_of(expert, hidden))
