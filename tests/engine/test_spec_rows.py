"""The pure parts of speculative decoding: token indices in the hidden state, sampled rows, roll-back, drafts."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from gatemix.engine.prefix_state import PrefixState
from gatemix.engine.request_gates import BatchGateTable, RequestGate
from gatemix.engine.row_payload import decode_token_index, encode_token_index
from gatemix.engine.sampled_rows import sampled_rows
from gatemix.engine.spec_decode import check_draft
from gatemix.errors import UserError


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_token_indices_survive_the_model_dtype(dtype):
    digits = encode_token_index(70_000, dtype, torch.device("cpu"))
    assert digits.dtype == dtype
    assert torch.equal(decode_token_index(digits), torch.arange(70_000))


def test_sampled_rows_name_request_position_and_the_draft_tokens_each_row_assumes():
    # Row 0: a prefill chunk of 3 (its last token sampled); row 1: token 50 and drafts 51, 52 verified.
    query_start_loc = torch.tensor([0, 3, 6])
    input_ids = torch.tensor([7, 8, 9, 50, 51, 52])
    positions = torch.tensor([0, 1, 2, 10, 11, 12])
    rows = sampled_rows(torch.tensor([2, 3, 4, 5]), query_start_loc, input_ids, positions)
    assert rows.batch_rows == [0, 1, 1, 1]
    assert rows.positions == [2, 10, 11, 12]
    assert rows.conditioning == [[], [], [51], [51, 52]]


def test_trace_records_of_verified_rows_carry_their_index_and_assumed_drafts():
    table = BatchGateTable()
    table.rows[1] = RequestGate(None, None, "t", "ipc://x", num_prompt_tokens=8)  # three tokens out so far
    # Row 1 verifies its last output token (position 10) and two draft tokens after it.
    table.forward_batch = (torch.tensor([0, 2, 5]), torch.tensor([1, 2, 60, 61, 62]), torch.tensor([0, 1, 10, 11, 12]))
    log_weights = torch.log(torch.tensor([[0.5, 0.5], [0.1, 0.9], [0.2, 0.8], [0.3, 0.7]]))
    table.note_sampling_call(log_weights, torch.tensor([1, 2, 3, 4]))
    (records,) = table.trace_records(num_rows=2).values()
    assert [(index, conditioning) for _, index, _, conditioning in records] == [(3, []), (4, [61]), (5, [61, 62])]
    assert records[1][2] == pytest.approx([0.2, 0.8])


def test_a_state_rolls_back_to_the_last_accepted_token_and_no_further():
    state = PrefixState(log_likelihood=torch.tensor([4.0, 4.0]), next_position=14, pending_slot=3)
    state.recent_states = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [4.0, 4.0]])  # after 10..13
    state.pending_earlier = {10: 0, 11: 1, 12: 2, 13: 3}
    assert not state.roll_back(10)  # a verify step always commits at least one token
    assert not state.roll_back(14)  # nothing to forget
    assert state.roll_back(12)  # tokens 10, 11 accepted: S through 11, the logits at 11 next
    assert state.next_position == 12 and state.pending_slot == 1
    torch.testing.assert_close(state.log_likelihood, torch.tensor([2.0, 2.0]))


def _model(folder, vocab: int, tokenizer: dict | None):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"vocab_size": vocab, "architectures": ["LlamaForCausalLM"]}))
    if tokenizer is not None:
        (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    return folder


def test_drafts_that_cannot_be_exact_are_refused_in_one_line(tmp_path):
    tokens = {"model": {"vocab": {"a": 0, "b": 1}}, "added_tokens": []}
    target = _model(tmp_path / "target", 2, tokens)
    check_draft(target, _model(tmp_path / "same", 2, tokens))
    check_draft(target, _model(tmp_path / "no-tokenizer", 2, None))  # assumed shared, with a warning
    cases = {
        "missing": (tmp_path / "nowhere", "not a model folder"),
        "vocab": (_model(tmp_path / "vocab", 3, tokens), "vocabulary of 3 tokens"),
        "tokenizer": (_model(tmp_path / "tok", 2, {"model": {"vocab": {"b": 0, "a": 1}}, "added_tokens": []}),
                      "tokenizer differs"),
    }
    for draft, message in cases.values():
        with pytest.raises(UserError, match=message) as error:
            check_draft(target, draft)
        assert "\n" not in str(error.value)
    composite = shutil.copytree(target, tmp_path / "composite")
    (composite / "config.json").write_text(json.dumps({"vocab_size": 2, "gatemix": {}}))
    with pytest.raises(UserError, match="composite cannot be a draft"):
        check_draft(target, composite)
