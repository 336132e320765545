"""The steady decode path's row bookkeeping (``engine/decode_run.py``), against vLLM's own dict update."""

from __future__ import annotations

import pytest
import torch
from vllm.v1.sample.logits_processor.builtin import process_dict_updates
from vllm.v1.sample.logits_processor.interface import BatchUpdate, MoveDirectionality

from gatemix.engine.decode_run import DecodeRun, surviving_rows

MOVE, SWAP = MoveDirectionality.UNIDIRECTIONAL, MoveDirectionality.SWAP


def _update(batch_size, removed=(), moved=(), added=()):
    return BatchUpdate(batch_size=batch_size, removed=list(removed), added=list(added), moved=list(moved))


@pytest.mark.parametrize("update, num_rows", [
    (_update(3, removed=[1], moved=[(3, 1, MOVE)]), 4),  # a request ends, the last row fills its hole
    (_update(2, removed=[0, 2], moved=[(3, 0, MOVE)]), 4),  # two end
    (_update(4, moved=[(0, 3, SWAP), (1, 2, SWAP)]), 4),  # reordered
    (_update(2, moved=[(2, 1, MOVE)]), 3),  # a move over a row that ended
    (_update(3, removed=[3]), 4),  # the last row ends
])
def test_surviving_rows_follow_vllms_dict_update(update, num_rows):
    """Row j of the dense states after the update is the state vLLM's dict update puts at row j."""
    entries = {row: f"request {row}" for row in range(num_rows)}
    process_dict_updates(entries, update, lambda *_: None)
    rows = surviving_rows(update, num_rows)
    assert [f"request {row}" for row in rows] == [entries[j] for j in range(update.batch_size)]
    run = DecodeRun(torch.arange(num_rows, dtype=torch.float32)[:, None].repeat(1, 3), torch.ones(num_rows, 1))
    run.keep_rows(torch.tensor(rows))
    assert run.states[:, 0].tolist() == [float(row) for row in rows] and run.forgetting.shape == (len(rows), 1)


def test_a_joining_request_or_a_hole_ends_the_run():
    assert surviving_rows(_update(3, added=[(2, None, [1], [])]), 2) is None  # its prefill is no decode step
    assert surviving_rows(_update(3, removed=[1]), 3) is None  # row 1 left empty: not a dense batch
