"""Per-request gate settings inside the vLLM worker.

vLLM's model interface sees a flat batch of tokens, not requests. The one
extension point that is told, before every forward pass, which request sits in
which batch row, and with which ``SamplingParams``, is a v1 logits processor.
``RequestGateProcessor`` is that processor: it keeps a per-process table of
batch rows -> ``RequestGate`` that the composite model reads in ``forward`` (to
pin or restrict the weights of each row's tokens) and, after sampling, pushes
each traced row's gate weights out through ``gate_trace``.

Requests carry their settings in ``SamplingParams.extra_args["gatemix"]``;
``gate_request_args`` builds that dict. The processor is installed through the
``vllm.logits_processors`` entry point, so every engine in an environment where
gatemix is installed has it; for other models it does nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gatemix.engine.composite_folder import is_composite_architecture
from gatemix.engine.gate_trace import TraceRecord, TraceSender
from gatemix.engine.prefix_state import BatchLayout, PrefixStates
from gatemix.engine.sampled_rows import SampledRows, sampled_rows
from gatemix.gate.mixing import LOG_WEIGHT_FLOOR, restrict_log_weights

logger = logging.getLogger(__name__)

GATE_ARGS_KEY = "gatemix"
COMPOSITE_LAYER_PREFIX = "ensemble."  # the composite's modules (composite_model.ExpertEnsemble)


def gate_request_args(
    *,
    pinned_weights: Sequence[float] | None = None,
    expert_mask: Sequence[bool] | None = None,
    trace_id: str | None = None,
    trace_to: str | None = None,
    gate_version: str | None = None,
) -> dict:
    """``SamplingParams.extra_args`` for one request. Weights are in expert order.

    ``gate_version``: the gate the server reported when the request arrived;
    the worker serves it with that gate while it is loaded (``gate_versions``).
    """
    args: dict = {}
    if gate_version is not None:
        args["gate_version"] = gate_version
    if pinned_weights is not None:
        args["weights"] = [float(w) for w in pinned_weights]
    if expert_mask is not None:
        args["experts_mask"] = [bool(m) for m in expert_mask]
    if trace_id is not None and trace_to is not None:
        args["trace_id"], args["trace_to"] = trace_id, trace_to
    return {GATE_ARGS_KEY: args}


@dataclass
class RequestGate:
    """One batch row's gate settings, parsed once when the request joins the batch."""

    pinned_log_weights: torch.Tensor | None  # (K,)
    expert_mask: torch.Tensor | None  # (K,) bool
    trace_id: str | None
    trace_to: str | None
    # A sampled token's output index is its position less this: the same whatever the order of
    # steps. vLLM's output list is not: async scheduling puts placeholders in it, one per step in
    # flight, and with a draft as many as the draft tokens, optimistically, until the next step.
    # None (prompt embeddings, which composites do not take): not traced.
    num_prompt_tokens: int | None


def parse_request_gate(extra_args: dict | None, prompt_token_ids: list[int] | None) -> RequestGate | None:
    args = (extra_args or {}).get(GATE_ARGS_KEY)
    if not args:
        return None
    pinned = args.get("weights")
    pinned_log = None
    if pinned is not None:
        probs = torch.tensor(pinned, dtype=torch.float64)
        pinned_log = torch.log(probs / probs.sum()).clamp_min(LOG_WEIGHT_FLOOR).float()
    mask = args.get("experts_mask")
    return RequestGate(
        pinned_log_weights=pinned_log,
        expert_mask=torch.tensor(mask, dtype=torch.bool) if mask is not None else None,
        trace_id=args.get("trace_id"),
        trace_to=args.get("trace_to"),
        num_prompt_tokens=None if prompt_token_ids is None else len(prompt_token_ids),
    )


class BatchGateTable:
    """Worker-process state shared by the logits processor and the composite model."""

    def __init__(self) -> None:
        self.rows: dict[int, RequestGate] = {}
        self.last_sample_log_weights: torch.Tensor | None = None  # (N, K) of the last sampling call
        # With a draft, which request and position each of its rows is (None: row i is batch row i).
        self.last_sampled: SampledRows | None = None
        self.forward_batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # qsl, ids, positions
        self.prefix_states = PrefixStates()  # every row's posterior state (used by posterior gates)
        self.sender = TraceSender()
        self._dense: tuple[torch.Tensor, ...] | None = None  # row tensors, rebuilt when rows change

    def rows_changed(self) -> None:
        self._dense = None

    def _dense_overrides(self, num_experts: int, device: torch.device) -> tuple[torch.Tensor, ...] | None:
        """Per-row ``(R, K)`` pins and masks with ``(R,)`` flags; None when no row overrides."""
        if self._dense is None:
            overriding = {
                row: gate for row, gate in self.rows.items()
                if gate.pinned_log_weights is not None or gate.expert_mask is not None
            }
            if not overriding:
                self._dense = ()
            else:
                num_rows = max(overriding) + 1
                pins = torch.zeros(num_rows, num_experts)
                has_pin = torch.zeros(num_rows, dtype=torch.bool)
                masks = torch.ones(num_rows, num_experts, dtype=torch.bool)
                for row, gate in overriding.items():
                    if gate.pinned_log_weights is not None:
                        pins[row], has_pin[row] = gate.pinned_log_weights, True
                    if gate.expert_mask is not None:
                        masks[row] = gate.expert_mask
                self._dense = tuple(t.to(device) for t in (pins, has_pin, masks))
        return self._dense or None

    def apply_overrides(self, log_weights: torch.Tensor, token_rows: torch.Tensor | None) -> torch.Tensor:
        """Pin or restrict the ``(T, K)`` log weights of tokens whose request asks for it.

        ``token_rows`` maps each token to its batch row; None (profiling runs) skips.
        """
        dense = self._dense_overrides(log_weights.shape[-1], log_weights.device) if token_rows is not None else None
        if dense is None:
            return log_weights
        pins, has_pin, masks = dense
        in_table = token_rows < pins.shape[0]
        rows = token_rows.clamp(max=pins.shape[0] - 1)
        pinned = has_pin[rows] & in_table  # (T,)
        log_weights = torch.where(pinned.unsqueeze(-1), pins[rows].to(log_weights), log_weights)
        token_masks = masks[rows] | ~in_table.unsqueeze(-1)  # (T, K); rows past the table keep all experts
        return restrict_log_weights(log_weights, token_masks)

    def note_sampling_call(self, log_weights: torch.Tensor, token_index: torch.Tensor | None) -> SampledRows | None:
        """Keep a ``compute_logits`` call's ``(N, K)`` weights; its rows' requests when several per request.

        ``token_index``: ``(N,)`` each row's token in the last forward pass, with a
        draft (None without one: one row per request). With one row per request
        (no draft tokens this step) row i is batch row i and nothing is read back
        from the device.
        """
        self.last_sample_log_weights, self.last_sampled = log_weights, None
        if self.forward_batch is None or token_index is None:  # profiling and warm-up runs; no draft
            return None
        query_start_loc, input_ids, positions = self.forward_batch
        if log_weights.shape[0] != query_start_loc.shape[0] - 1:
            self.last_sampled = sampled_rows(token_index, query_start_loc, input_ids, positions)
        return self.last_sampled

    def traced_step(self, num_rows: int) -> TracedStep | None:
        """The last sampling call's traced rows, their weights on their way to the host; None if none.

        ``num_rows``: the rows the sampler applies logits processors to, one per
        request. Nothing here waits for the device: the copies are queued behind
        the step (``TracedStep.wait``).
        """
        log_weights, sampled = self.last_sample_log_weights, self.last_sampled
        if log_weights is None or (sampled is None and log_weights.shape[0] != num_rows):
            return None
        batch_rows = range(num_rows) if sampled is None else sampled.batch_rows
        rows = [
            (index, gate, [] if sampled is None else sampled.conditioning[index])
            for index, row in enumerate(batch_rows)
            if (gate := self.rows.get(row)) is not None and gate.trace_id is not None
            and gate.num_prompt_tokens is not None
        ]
        if not rows:
            return None
        if sampled is not None:
            positions = sampled.positions
        elif self.forward_batch is not None:
            query_start_loc, _, forward_positions = self.forward_batch
            positions = forward_positions[query_start_loc[1 : num_rows + 1] - 1].to("cpu", non_blocking=True)
        else:
            return None
        weights = log_weights.float().exp().to("cpu", non_blocking=True)  # (N, K)
        copied = None
        if log_weights.is_cuda:  # the copies run behind the step on the device's stream
            copied = torch.cuda.Event()
            copied.record()
        return TracedStep(rows, weights, positions, copied)

    def trace_records(self, num_rows: int) -> dict[str, list[TraceRecord]]:
        """``traced_step``'s records, waited for here (the worker's sender thread waits instead)."""
        step = self.traced_step(num_rows)
        if step is None:
            return {}
        step.wait()
        return step.records()


@dataclass
class TracedStep:
    """One sampling call's traced rows: what ``gate_trace.TraceSender`` sends once the copies are done."""

    rows: list[tuple[int, RequestGate, list[int]]]  # (sampled row, its request's gate, the draft tokens it assumes)
    weights: torch.Tensor  # (N, K) on the host once copied
    positions: torch.Tensor | list[int]  # (N,) the position each row samples after
    copied: torch.cuda.Event | None  # None: already on the host

    @property
    def copying(self) -> bool:
        return self.copied is not None

    def wait(self) -> None:
        if self.copied is not None:
            self.copied.synchronize()

    def records(self) -> dict[str, list[TraceRecord]]:
        """Records grouped by destination address.

        A record's token index is the position its row samples after, plus one,
        less the prompt's length: it does not depend on which steps the worker
        has seen the tokens of. Each names the draft tokens its weights are
        conditioned on (none without a draft), so the server keeps it only if
        they were accepted. A row that samples inside its prompt (a prefill
        chunk that is not the last, whose token vLLM discards) sends nothing.
        """
        weights = self.weights.tolist()
        positions = self.positions if isinstance(self.positions, list) else self.positions.tolist()
        by_address: dict[str, list[TraceRecord]] = {}
        for index, gate, conditioning in self.rows:
            token_index = positions[index] + 1 - gate.num_prompt_tokens
            if token_index >= 0:
                by_address.setdefault(gate.trace_to, []).append((gate.trace_id, token_index, weights[index], conditioning))
        return by_address


_WORKER_TABLE: BatchGateTable | None = None


def worker_gate_table() -> BatchGateTable:
    """The table of this worker process (created on first use, never at import)."""
    global _WORKER_TABLE
    if _WORKER_TABLE is None:
        _WORKER_TABLE = BatchGateTable()
    return _WORKER_TABLE


def _attention_metadata():
    """This forward pass's attention metadata (any layer's: they share the batch layout), or None."""
    # vllm: deferred, the server imports this module's request args without an engine
    from vllm.forward_context import get_forward_context, is_forward_context_available

    if not is_forward_context_available():
        return None
    attn_metadata = get_forward_context().attn_metadata
    if not attn_metadata:
        return None
    if isinstance(attn_metadata, list):  # micro-batched: one dict per ubatch
        attn_metadata = attn_metadata[0]
    if not isinstance(attn_metadata, dict):
        return attn_metadata
    # An expert's layer: a draft model's layers may sit in another KV cache group (other slots).
    name = next((name for name in attn_metadata if name.startswith(COMPOSITE_LAYER_PREFIX)), None)
    return attn_metadata[name] if name is not None else next(iter(attn_metadata.values()))


def batch_layout_from_forward_context() -> BatchLayout | None:
    """Rows and KV slots of this forward pass's tokens; None in profiling and warm-up runs."""
    metadata = _attention_metadata()
    query_start_loc = getattr(metadata, "query_start_loc", None)
    if query_start_loc is None:
        return None
    return BatchLayout(
        query_start_loc, metadata.slot_mapping, metadata.block_table,
        num_tokens=int(metadata.num_actual_tokens), max_query_len=int(metadata.max_query_len),
    )


def query_start_loc_from_forward_context() -> torch.Tensor | None:
    """``(num_rows + 1,)``: where each batch row's tokens start in this forward pass.

    Tokens are laid out in batch-row order. None outside a forward pass with
    requests (profiling and warm-up runs).
    """
    return getattr(_attention_metadata(), "query_start_loc", None)


def token_rows(query_start_loc: torch.Tensor | None, num_tokens: int, device: torch.device) -> torch.Tensor | None:
    """Batch row of each of a forward pass's ``num_tokens`` tokens; padding maps past the last row.

    ``query_start_loc``: ``query_start_loc_from_forward_context()`` (None: no requests, None back).
    """
    if query_start_loc is None:
        return None
    positions = torch.arange(num_tokens, device=query_start_loc.device)
    rows = torch.searchsorted(query_start_loc[1:], positions, right=True)
    return rows.to(device)


def _load_logits_processor_base():
    # vllm: deferred, as above
    from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
    from vllm.v1.sample.logits_processor.builtin import process_dict_updates

    return BatchUpdate, LogitsProcessor, process_dict_updates


_BatchUpdate, _LogitsProcessor, _process_dict_updates = _load_logits_processor_base()


class RequestGateProcessor(_LogitsProcessor):
    """Tracks batch rows' gate settings and exports sampled tokens' weights; never edits logits."""

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        architectures = getattr(vllm_config.model_config.hf_config, "architectures", None) or []
        self.active = is_composite_architecture(architectures)
        self.table = worker_gate_table()

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        args = (sampling_params.extra_args or {}).get(GATE_ARGS_KEY)
        if args is None:
            return
        if not isinstance(args, dict):
            raise ValueError(f"extra_args[{GATE_ARGS_KEY!r}] must be an object")  # noqa: TRY004 vLLM's 400
        weights = args.get("weights")
        if weights is not None and (
            not all(isinstance(w, (int, float)) and w >= 0 for w in weights) or sum(weights) <= 0
        ):
            raise ValueError("gate weights must be non-negative numbers with a positive sum")
        mask = args.get("experts_mask")
        if mask is not None and not any(mask):
            raise ValueError("the expert subset must name at least one expert")

    def is_argmax_invariant(self) -> bool:
        # False makes vLLM call apply() on greedy steps too, where the trace is exported.
        return not self.active

    def update_state(self, batch_update) -> None:
        if self.active:
            self.table.prefix_states.update(batch_update)
        if self.active and _process_dict_updates(
            self.table.rows,
            batch_update,
            lambda params, prompt_ids, _output_ids: parse_request_gate(params.extra_args, prompt_ids),
        ):
            self.table.rows_changed()

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if self.active and self.table.rows:
            step = self.table.traced_step(logits.shape[0])
            if step is not None:
                self.table.sender.submit(step)
        return logits
