"""Per-row gate overrides, as the composite model applies them to a flat token batch."""

import math

import torch

from gatemix.engine.request_gates import BatchGateTable, gate_request_args, parse_request_gate


def _table(rows: dict[int, dict]) -> BatchGateTable:
    table = BatchGateTable()
    for row, args in rows.items():
        table.rows[row] = parse_request_gate(gate_request_args(**args), prompt_token_ids=[1, 2, 3])
    return table


def test_rows_without_overrides_keep_the_router_weights():
    log_weights = torch.log_softmax(torch.randn(5, 3), -1)
    table = _table({0: {"trace_id": "a", "trace_to": "ipc://x"}})
    out = table.apply_overrides(log_weights, torch.tensor([0, 0, 1, 1, 1]))
    torch.testing.assert_close(out, log_weights)


def test_pins_apply_to_their_own_rows_tokens_only():
    log_weights = torch.log_softmax(torch.randn(6, 3), -1)
    table = _table({1: {"pinned_weights": [0.0, 1.0, 0.0]}, 2: {"pinned_weights": [2.0, 1.0, 1.0]}})
    token_rows = torch.tensor([0, 0, 1, 1, 2, 3])  # row 3 is past the table (padding)
    weights = table.apply_overrides(log_weights, token_rows).exp()
    torch.testing.assert_close(weights[[0, 1, 5]], log_weights.exp()[[0, 1, 5]])
    torch.testing.assert_close(weights[2:4], torch.tensor([[0.0, 1.0, 0.0]] * 2))
    torch.testing.assert_close(weights[4], torch.tensor([0.5, 0.25, 0.25]))


def test_subset_restriction_renormalizes_the_router_weights():
    log_weights = torch.log(torch.tensor([[0.5, 0.3, 0.2]] * 2))
    table = _table({0: {"expert_mask": [True, False, True]}})
    weights = table.apply_overrides(log_weights, torch.tensor([0, 1])).exp()
    torch.testing.assert_close(weights[0], torch.tensor([0.5 / 0.7, 0.0, 0.2 / 0.7]))
    torch.testing.assert_close(weights[1], torch.tensor([0.5, 0.3, 0.2]))


def test_trace_records_carry_the_sampled_token_s_index_per_destination():
    """The index is the sampled token's position less the prompt's length, whatever vLLM's output
    list holds (async scheduling's placeholders); a row still inside its prompt sends nothing."""
    table = _table({0: {"trace_id": "a", "trace_to": "ipc://x"}, 2: {"trace_id": "b", "trace_to": "ipc://y"},
                    3: {"trace_id": "c", "trace_to": "ipc://y"}})
    # Prompts of 3 tokens. Row 0 decodes after its 2nd output token (position 4), row 1 is
    # untraced, row 2 ends its prompt (position 2), row 3 is a first prefill chunk (position 1).
    table.forward_batch = (torch.tensor([0, 1, 2, 5, 7]), torch.zeros(7, dtype=torch.long),
                           torch.tensor([4, 9, 0, 1, 2, 0, 1]))
    table.last_sample_log_weights = torch.log(torch.tensor([[0.25, 0.75], [0.5, 0.5], [1.0, 0.0], [0.5, 0.5]]))
    records = table.trace_records(num_rows=4)
    assert records["ipc://x"] == [("a", 2, [0.25, 0.75], [])]
    assert [record[:2] for record in records["ipc://y"]] == [("b", 0)]
    assert math.isclose(records["ipc://y"][0][2][0], 1.0)
    assert table.trace_records(num_rows=3) == {}  # a call of another shape is not this step's sample
