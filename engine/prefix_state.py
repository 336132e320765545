"""Per-request posterior state in the vLLM worker: each expert's log-likelihood of the prefix.

A posterior gate (``RouterForm.posterior``) weighs expert k at position t by
``prior_k + S_k(t)``, ``S_k(t) = lambda S_k(t-1) + log pi_k(x_t | x_<t)`` over
every token of the request's own sequence, prompt included
(``gate/posterior.py``). The engine keeps ``S`` per request, from step to step:

* **Where it lives.** ``PrefixStates.rows``: batch row -> ``PrefixState``, in the
  worker process, beside the per-request pins (``request_gates``). The logits
  processor's batch updates create a fresh state when a request joins the batch
  and move it with its row; **a finished, aborted or preempted request's state
  is freed** when the batch update removes its row.
* **How it updates.** In ``forward`` each scheduled chunk of a request (a prefill
  chunk, or the one token of a decode step) continues its state: the log-prob of
  a token whose predecessor is in the same chunk comes from the experts' logits
  at that predecessor, gathered at the target token in pieces of bounded
  size (``engine/head_logprobs.py``: never a tokens x K x V log-softmax); the
  chunk's first token's comes from the previous step's logits at its
  predecessor, which the engine's sampling call (``compute_logits``, one row per
  request) left behind (``store_sampled``). A decode step costs no extra LM head,
  and while every row decodes (requests ending included) the states stay one
  dense tensor updated without per-row Python or host syncs (``engine/decode_run.py``).
* **Prefix caching.** With caching on, every computed token's expert log-probs
  and every block's last hidden states go to a side table keyed by KV slot
  (``engine/slot_logprobs.py``). A request whose first chunk starts after cached
  blocks rebuilds its state from them with its own gate's forgetting factor,
  and its first token's log-probs from the last cached block's hidden states.
  Requests that hit blocks computed in the same forward pass are continued in
  order of their cached length, after the table holds this pass's tokens.
* **Exact under** chunked prefill (chunks continue the state); preemption with
  recompute (the request rejoins as new and continues from its cached blocks or
  recomputes them); ``n > 1`` (each child is its own request); ``echo`` prompt
  logprobs (each prompt position's weights travel with its own hidden state
  from ``forward``; vLLM does not read the prefix cache for a request with
  prompt logprobs). A chunk that does not start where its request's state ends,
  or at a cached block boundary, is an error, not a silent miss.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from gatemix.engine.decode_run import DecodeRun, surviving_rows
from gatemix.engine.sampled_rows import SampledRows
from gatemix.engine.slot_logprobs import SlotLogprobs
from gatemix.gate.posterior import final_state, forgetting_scan


@dataclass
class PrefixState:
    """One request's state: ``S`` through ``next_position - 1``, and where its next log-probs are."""

    log_likelihood: torch.Tensor | None = None  # (K,) float32; None: nothing seen yet
    next_position: int = 0  # the position of the first token not yet folded into S
    pending_slot: int | None = None  # row of PrefixStates.pending for the token at next_position
    gate_version: str | None = None  # the gate the request joined the batch with (gate_versions.py)
    # With a draft: S after each token of the last chunk (the L positions before next_position),
    # and the pending rows of the last sampling call's earlier positions, to roll back to the last
    # accepted token.
    recent_states: torch.Tensor | None = None  # (L, K)
    pending_earlier: dict[int, int] | None = None  # position -> row of PrefixStates.pending

    def fresh(self) -> bool:
        return self.next_position == 0 and self.log_likelihood is None

    def roll_back(self, position: int) -> bool:
        """Forget the tokens from ``position`` on (rejected draft tokens); False if they cannot be.

        The state through ``position - 1`` is one of the last chunk's; the experts'
        log-probs at ``position - 1`` are a row of the last sampling call.
        """
        earlier = self.pending_earlier or {}
        if self.recent_states is None:
            return False
        recent_start = self.next_position - self.recent_states.shape[0]
        if not recent_start < position < self.next_position or position - 1 not in earlier:
            return False
        self.log_likelihood = self.recent_states[position - 1 - recent_start]
        self.next_position, self.pending_slot = position, earlier[position - 1]
        return True


class PrefixStateError(RuntimeError):
    """The engine scheduled tokens the state cannot account for (a bug)."""


@dataclass
class BatchLayout:
    """Where this forward pass's tokens sit: per row (``query_start_loc``) and in the KV cache."""

    query_start_loc: torch.Tensor  # (R + 1,)
    slot_mapping: torch.Tensor  # (T,) KV slot of each token
    block_table: torch.Tensor  # (R, max blocks) each row's KV blocks
    num_tokens: int  # tokens with a request (the rest of the batch is padding); known on the host
    max_query_len: int  # 1: a decode step, one token per row


class PrefixStates:
    """Every batch row's ``PrefixState`` and the last sampling call's expert log-probs."""

    def __init__(self) -> None:
        self.rows: dict[int, PrefixState] = {}
        self.pending: torch.Tensor | None = None  # (N, K, V) log-softmax of the last sampling call
        self._awaiting_sample_rows = 0  # rows of the last forward, until compute_logits stores them
        self.current_gate_version: str | None = None  # what a request joining the batch gets
        self.slots: SlotLogprobs | None = None  # with prefix caching: the side table (configure_caching)
        self._num_blocks: Callable[[], int | None] = lambda: None
        self._decode_run: DecodeRun | None = None

    def configure_caching(self, block_size: int, num_blocks: Callable[[], int | None]) -> None:
        """Keep the side table prefix caching needs; ``num_blocks`` is read once the KV cache exists."""
        self.slots, self._num_blocks = SlotLogprobs(block_size), num_blocks

    def update(self, batch_update) -> None:
        """Apply one logits-processor batch update: fresh state for added rows, moves, removals."""
        # vllm: deferred, the server imports this module (via request_gates) without an engine
        from vllm.v1.sample.logits_processor.builtin import process_dict_updates

        if batch_update is not None and not self._carry_decode_run(batch_update):
            self._flush_decode_run()
        process_dict_updates(
            self.rows, batch_update,
            lambda params, _prompt, _output: PrefixState(gate_version=self._version_asked(params)),
        )

    def _carry_decode_run(self, batch_update) -> bool:
        """Keep the decode run through an update that only removes and moves rows; False if it cannot be."""
        run = self._decode_run
        if run is None or self._awaiting_sample_rows or self.pending is None:
            return False
        num_rows = run.states.shape[0]
        if self.pending.shape[0] != num_rows or len(self.rows) != num_rows:
            return False
        rows = surviving_rows(batch_update, num_rows)
        if rows is None:
            return False
        index = torch.tensor(rows, device=run.states.device, dtype=torch.long)
        run.keep_rows(index)
        self.pending = self.pending[index.to(self.pending.device)]
        return True

    def _version_asked(self, params) -> str | None:
        """The version the request names (the server's at its arrival), else the current one."""
        args = ((params.extra_args if params is not None else None) or {}).get("gatemix") or {}
        return args.get("gate_version") or self.current_gate_version

    def version_of(self, row: int) -> str | None:
        state = self.rows.get(row)
        return None if state is None else state.gate_version

    def token_states(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        layout: BatchLayout | None,
        target_logprobs: Callable[[torch.Tensor, torch.Tensor], torch.Tensor | None],
        forgetting_of_row: Callable[[int], torch.Tensor],
        expert_hidden: torch.Tensor,
        num_experts: int,
    ) -> torch.Tensor:
        """``(T, K)`` state at every token of this forward pass, each row's state continued.

        ``target_logprobs(hidden, targets)`` -> ``(M, K)`` experts' log-probs of
        ``targets`` after those ``(M, H)`` hidden states, in bounded pieces
        (``engine/head_logprobs.py``); None on a tensor-parallel rank that does
        not receive logits: its gate weights are never used, so its state stays zero.
        """
        states = torch.zeros(input_ids.shape[0], num_experts, device=input_ids.device)
        if layout is None:  # a profiling or warm-up run: no requests
            return states
        if self._continues_decode_run(layout):
            return self._decode_step(input_ids, positions, layout, expert_hidden, states)
        self._flush_decode_run()
        starts = layout.query_start_loc.tolist()
        spans = [(row, starts[row], starts[row + 1]) for row in range(len(starts) - 1) if starts[row + 1] > starts[row]]
        token_logprobs = torch.zeros_like(states)  # (T, K): log pi_k(x_t | x_<t) of each token
        in_chunk = [index for _, start, end in spans for index in range(start, end - 1)]
        if in_chunk:
            index = torch.tensor(in_chunk, device=input_ids.device)
            logprobs = target_logprobs(expert_hidden[index], input_ids[index + 1])
            if logprobs is None:
                return states
            token_logprobs[index + 1] = logprobs
        first_positions = positions[layout.query_start_loc[:-1].clamp_max(max(input_ids.shape[0] - 1, 0))].tolist()
        chunks = self._known_chunks(spans, first_positions)
        self._first_token_logprobs(chunks, input_ids, token_logprobs)
        if self.slots is not None:
            self._continue_cached(chunks, first_positions, layout, input_ids, positions, token_logprobs,
                                  target_logprobs, forgetting_of_row, expert_hidden)
        self._scan(chunks, token_logprobs, states, forgetting_of_row, num_experts)
        self._awaiting_sample_rows = len(starts) - 1
        if layout.max_query_len == 1 and [chunk[0] for chunk in chunks] == list(range(len(starts) - 1)):
            forgetting = torch.stack([forgetting_of_row(row).to(states) for row, _, _, _ in chunks])
            self._decode_run = DecodeRun(states[: len(chunks)].clone(), forgetting[:, None])
        return states

    def _continues_decode_run(self, layout: BatchLayout) -> bool:
        run = self._decode_run
        return (
            run is not None and layout.max_query_len == 1 and layout.num_tokens == run.states.shape[0]
            and self._awaiting_sample_rows == 0  # the last step was sampled: its log-probs are the pending ones
            and self.pending is not None and self.pending.shape[0] == run.states.shape[0]
        )

    def _decode_step(self, input_ids, positions, layout: BatchLayout, expert_hidden, states) -> torch.Tensor:
        """``S = lambda S + lp`` for every row at once; the log-probs from the last sampling call."""
        run = self._decode_run
        num_rows = run.states.shape[0]
        rows = torch.arange(num_rows, device=self.pending.device)
        token_logprobs = self.pending[rows, :, input_ids[:num_rows]].to(states)  # (R, K)
        run.states = run.forgetting * run.states + token_logprobs
        run.steps += 1
        states[:num_rows] = run.states
        if self.slots is not None:
            self.slots.write_rows(
                layout.slot_mapping[:num_rows], positions[:num_rows], token_logprobs, expert_hidden[:num_rows]
            )
        self._awaiting_sample_rows = num_rows
        return states

    def _flush_decode_run(self) -> None:
        """Write a decode run's dense states back to its rows' ``PrefixState`` objects, and end it."""
        run, self._decode_run = self._decode_run, None
        if run is None:
            return
        sampled = self._awaiting_sample_rows == 0  # the run's last step was sampled: its log-probs are pending
        for row, row_state in enumerate(run.states.unbind(0)):
            state = self.rows[row]
            state.pending_slot = row if sampled else None  # rows may have moved since: the pending rows did too
            if run.steps:
                state.log_likelihood = row_state
                state.next_position += run.steps
                state.recent_states, state.pending_earlier = None, None

    def _scan(self, chunks, token_logprobs: torch.Tensor, states: torch.Tensor, forgetting_of_row, num_experts: int) -> None:
        """Fold each chunk's ``(T, K)`` log-probs into its row's state; ``states`` gets every token's."""
        decode = [chunk for chunk in chunks if chunk[2] - chunk[1] == 1]
        if decode:  # one token each: S = lambda S + lp, all rows at once
            index = torch.tensor([start for _, start, _, _ in decode], device=states.device)
            previous = torch.stack([self._state_of(chunk[3], num_experts, states) for chunk in decode])
            forgetting = torch.stack([forgetting_of_row(row).to(states) for row, _, _, _ in decode])
            updated = forgetting[:, None] * previous + token_logprobs[index]  # (R, K)
            states[index] = updated
            for (_, _, _, state), row_state in zip(decode, updated.unbind(0)):
                state.log_likelihood = row_state
        for row, start, end, state in chunks:
            if end - start > 1:  # a prefill chunk, or a token and its draft: the scan over its tokens
                scanned = forgetting_scan(token_logprobs[start:end], forgetting_of_row(row), state.log_likelihood)
                states[start:end] = scanned
                state.log_likelihood = scanned[-1]
            state.recent_states = states[start:end]
            state.next_position += end - start
            state.pending_slot, state.pending_earlier = None, None

    def _known_chunks(self, spans, first_positions: list[int]) -> list[tuple[int, int, int, PrefixState]]:
        """``(row, start, end, state)`` of the rows with a request, each checked to continue its state."""
        chunks = []
        for row, start, end in spans:
            state = self.rows.get(row)
            if state is None:  # no request there: vLLM's warm-up and graph-capture runs
                continue
            cached = self.slots is not None and state.fresh()
            if first_positions[row] != state.next_position and not cached and not state.roll_back(first_positions[row]):
                raise PrefixStateError(
                    f"batch row {row}: tokens from position {first_positions[row]}, but its posterior state "
                    f"ends at {state.next_position}"
                )
            chunks.append((row, start, end, state))
        return chunks

    def _continue_cached(self, chunks, first_positions, layout: BatchLayout, input_ids, positions, token_logprobs,
                         target_logprobs, forgetting_of_row, expert_hidden) -> None:
        """Record this pass in the side table, then start each request that skipped cached blocks from them.

        A request may hit blocks another request computes in this same pass
        (vLLM caches a block when it is scheduled): the table is written with
        every token of the pass first, so those blocks' entries are there, and
        the first tokens of the requests that hit are written before any of
        them reads its prefix.
        """
        slots = self.slots
        num_blocks = self._num_blocks()
        if num_blocks is None:  # vLLM sets it on the worker's config before serving (a contract test)
            raise PrefixStateError("prefix caching is on, but the worker does not know the KV cache's size")
        slots.ensure(num_blocks, token_logprobs.shape[1], expert_hidden)
        slots.write(layout.slot_mapping, positions, token_logprobs, expert_hidden, layout.query_start_loc[-1])
        hits = [(first_positions[row], row, start, state) for row, start, _, state in chunks
                if state.fresh() and first_positions[row] > 0]
        if not hits:
            return
        prefixes = []
        for cached, row, start, _ in hits:
            if cached % slots.block_size:
                raise PrefixStateError(f"batch row {row}: a cache hit of {cached} tokens ends inside a block")
            prefixes.append(slots.prefix_slots(layout.block_table[row], cached, int(layout.slot_mapping[start])))
        starts = torch.tensor([start for _, _, start, _ in hits], device=input_ids.device)
        last_cached = torch.stack([prefix[-1] for prefix in prefixes])  # (R,)
        first = target_logprobs(slots.hidden_before(last_cached), input_ids[starts])  # (R, K)
        token_logprobs[starts] = first
        slots.token_logprobs[layout.slot_mapping[starts].long()] = first
        for (cached, row, _, state), prefix in zip(hits, prefixes):
            state.log_likelihood = final_state(slots.token_logprobs[prefix], forgetting_of_row(row))
            state.next_position = cached

    def _first_token_logprobs(self, chunks, input_ids: torch.Tensor, token_logprobs: torch.Tensor) -> None:
        """Each chunk's first token's log-probs, from the last sampling call's rows, gathered at once."""
        continuing = [(start, state.pending_slot) for _, start, _, state in chunks if state.next_position > 0]
        if not continuing:
            return
        if self.pending is None or any(slot is None for _, slot in continuing):
            raise PrefixStateError("a continuing request has no expert log-probs from the last step")
        index = torch.tensor([start for start, _ in continuing], device=input_ids.device)
        slots = torch.tensor([slot for _, slot in continuing], device=self.pending.device)
        token_logprobs[index] = self.pending[slots, :, input_ids[index]].to(token_logprobs)  # (R, K)

    @staticmethod
    def _state_of(state: PrefixState, num_experts: int, like: torch.Tensor) -> torch.Tensor:
        if state.log_likelihood is None:
            return like.new_zeros(num_experts)
        return state.log_likelihood

    def store_sampled(self, expert_logprobs: torch.Tensor, sampled: SampledRows | None = None) -> None:
        """Keep the sampling call's ``(N, K, V)`` log-probs.

        Only the first ``compute_logits`` after a forward pass is the sampling
        call (vLLM computes prompt logprobs after sampling). Without a draft it
        has one row per request of that pass (row i: batch row i's last token,
        ``sampled`` None); with one, a row per verified position (``sampled``).
        """
        if not self._awaiting_sample_rows:
            return
        if sampled is not None:
            self._store_verified(expert_logprobs, sampled)
            return
        if expert_logprobs.shape[0] != self._awaiting_sample_rows:
            return
        self.pending = expert_logprobs.detach()
        if self._decode_run is None or self._decode_run.steps == 0:  # a run's rows learn it when it ends
            for row in range(expert_logprobs.shape[0]):
                if row in self.rows:
                    self.rows[row].pending_slot = row
        self._awaiting_sample_rows = 0

    def _store_verified(self, expert_logprobs: torch.Tensor, sampled: SampledRows) -> None:
        """Rows of several positions per request: the last is the next token's, the rest for a roll-back."""
        self.pending = expert_logprobs.detach()
        for index, (row, position) in enumerate(zip(sampled.batch_rows, sampled.positions)):
            state = self.rows.get(row)
            if state is None:
                continue
            if position == state.next_position - 1:
                state.pending_slot = index
            if state.pending_earlier is None:
                state.pending_earlier = {}
            state.pending_earlier[position] = index
        self._awaiting_sample_rows = 0
