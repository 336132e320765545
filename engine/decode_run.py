"""The posterior state's steady state: rows decoding one token per step, their states dense.

Serving spends most steps decoding: every request in the batch adds one token.
``PrefixStates`` then keeps the rows' states as one ``(R, K)`` tensor and
updates it with a few tensor operations per step, with no per-row Python and
no host sync (``DecodeRun``). A request finishing, or vLLM compacting and
reordering its batch, does not end the run: the same removals and moves are
applied to the dense rows (``surviving_rows``), so a server whose requests end
one by one stays on this path. Only a joining request (its prefill is not a
decode) ends it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DecodeRun:
    """Rows ``0 .. R-1`` decoding one token per step: their states stay dense.

    The rows' ``PrefixState`` objects catch up (``PrefixStates._flush_decode_run``)
    when a request joins or a step is not a pure decode.
    """

    states: torch.Tensor  # (R, K) S of each row through its last token
    forgetting: torch.Tensor  # (R, 1) each row's gate's lambda
    steps: int = 0  # steps since the PrefixState objects were last written

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Row ``j`` becomes old row ``rows[j]``: ``(R',)`` indices into the current rows."""
        self.states, self.forgetting = self.states[rows], self.forgetting[rows]


def surviving_rows(batch_update, num_rows: int) -> list[int] | None:
    """The old row each batch row holds after a vLLM ``BatchUpdate`` that only removes and moves.

    ``num_rows``: the batch's rows before it. None when the update adds a
    request, or would leave a row of the new batch without one of the old
    rows (neither a decode run can follow). The removals and moves are applied
    as ``process_dict_updates`` (vLLM's) applies them to a dict of row states.
    """
    # vllm: deferred, the server imports the engine package without an engine
    from vllm.v1.sample.logits_processor.interface import MoveDirectionality

    if batch_update.added:
        return None
    holds = dict(enumerate(range(num_rows)))  # batch row -> old row
    for index in batch_update.removed:
        holds.pop(index, None)
    for a_index, b_index, direction in batch_update.moved:
        a_row, b_row = holds.pop(a_index, None), holds.pop(b_index, None)
        if a_row is not None:
            holds[b_index] = a_row
        if b_row is not None and direction == MoveDirectionality.SWAP:
            holds[a_index] = b_row
    if sorted(holds) != list(range(batch_update.batch_size)):
        return None
    return [holds[row] for row in range(batch_update.batch_size)]
