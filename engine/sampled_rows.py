"""Which request and position each row of a sampling call is, when a draft makes it several per request.

Without a draft vLLM samples one row per request, in batch-row order. With one
(``--draft``), it samples every verified position: the row of the request's last
accepted token, then one per draft token. The rows arrive at ``compute_logits``
with their token index in the forward pass (``row_payload``), from which this
module finds each row's request, position, and the draft tokens its
distribution is conditioned on: the gate trace reports a weight only where
those tokens were accepted (``gate_trace``).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch


@dataclass
class SampledRows:
    """Per row of the sampling call: batch row, position, conditioning."""

    batch_rows: list[int]
    positions: list[int]
    conditioning: list[list[int]]  # the draft tokens after the committed output the row sees


def sampled_rows(
    token_index: torch.Tensor, query_start_loc: torch.Tensor, input_ids: torch.Tensor, positions: torch.Tensor
) -> SampledRows:
    """``(N,)`` token indices into a forward pass of ``(R + 1,)`` row starts and ``(T,)`` ids/positions."""
    starts = query_start_loc.tolist()
    indices = token_index.tolist()
    ids = input_ids[token_index].tolist()
    token_positions = positions[token_index].tolist()
    batch_rows = [bisect.bisect_right(starts, index) - 1 for index in indices]
    offsets, conditioning = [], []
    for i, row in enumerate(batch_rows):
        offset = offsets[-1] + 1 if i and batch_rows[i - 1] == row else 0  # 0: the request's last committed token
        offsets.append(offset)
        conditioning.append(ids[i - offset + 1 : i + 1])
    return SampledRows(batch_rows, token_positions, conditioning)
