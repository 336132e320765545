"""The posterior state's log-prob gather: exact, and never more than its chunk of logits at once."""

from __future__ import annotations

import torch

from gatemix.engine.prefix_state import chunked_target_logprobs, target_chunk_rows


def test_the_chunked_gather_equals_the_full_log_softmax_and_stays_within_its_bound():
    torch.manual_seed(0)
    num_experts, vocab, width = 3, 1000, 8
    heads = torch.randn(num_experts, width, vocab)
    seen_rows = []

    def expert_logits(expert: int, hidden: torch.Tensor) -> torch.Tensor:  # (m, H) -> (m, V)
        seen_rows.append(hidden.shape[0])
        return hidden @ heads[expert]

    hidden, targets = torch.randn(70, width), torch.randint(0, vocab, (70,))
    rows = target_chunk_rows(vocab, max_elements=16 * vocab)
    assert rows == 16
    got = chunked_target_logprobs(expert_logits, num_experts, hidden, targets, rows)  # (70, K)
    assert seen_rows == [16] * 12 + [6] * 3  # never more than one expert's 16 rows of logits
    full = torch.log_softmax(torch.einsum("mh,khv->mkv", hidden, heads), dim=-1)  # (70, K, V)
    expected = full.gather(-1, targets[:, None, None].expand(-1, num_experts, 1))[..., 0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_a_rank_without_logits_gets_none():
    no_logits = chunked_target_logprobs(lambda k, hidden: None, 2, torch.zeros(3, 2), torch.zeros(3, dtype=torch.long), 2)
    assert no_logits is None
