"""The posterior state's log-prob gather: exact, and never more than its chunk or tile of logits at once."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gatemix.engine import head_logprobs
from gatemix.engine.head_logprobs import (
    ExpertHeads,
    agrees_with_compute_logits,
    chunked_target_logprobs,
    target_chunk_rows,
    tiled_target_logprobs,
)


def _reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``(M, H)``, ``(V, H)``, ``(M,)`` -> ``(M,)`` from a float64 log-softmax over the whole vocabulary."""
    return torch.log_softmax(hidden.double() @ weight.double().T, dim=-1).gather(-1, targets[:, None])[:, 0]


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
    got = torch.stack([
        chunked_target_logprobs(lambda h, k=k: expert_logits(k, h), hidden, targets, rows) for k in range(num_experts)
    ], dim=-1)  # (70, K)
    assert seen_rows == ([16] * 4 + [6]) * num_experts  # never more than one expert's 16 rows of logits
    full = torch.log_softmax(torch.einsum("mh,khv->mkv", hidden, heads), dim=-1)  # (70, K, V)
    expected = full.gather(-1, targets[:, None, None].expand(-1, num_experts, 1))[..., 0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_a_rank_without_logits_gets_none():
    no_logits = chunked_target_logprobs(lambda hidden: None, torch.zeros(3, 2), torch.zeros(3, dtype=torch.long), 2)
    assert no_logits is None


def test_the_tiled_gather_equals_the_full_log_softmax_and_stays_within_its_tile(monkeypatch):
    torch.manual_seed(0)
    vocab, width = 1000, 16
    weight, hidden = torch.randn(vocab, width) * 0.5, torch.randn(70, width)
    targets = torch.randint(0, vocab, (70,))
    tiles, buffers = [], set()
    mm = torch.mm

    def recording_mm(rows, weight_rows, out):
        tiles.append(tuple(out.shape))
        buffers.add(out.untyped_storage().data_ptr())
        return mm(rows, weight_rows, out=out)

    monkeypatch.setattr(torch, "mm", recording_mm)
    got = tiled_target_logprobs(weight, hidden, targets, tile_rows=32, tile_vocab=128)  # (70,)
    monkeypatch.undo()
    assert max(rows * columns for rows, columns in tiles) <= 32 * 128
    assert sum(columns for rows, columns in tiles if rows == 32) == 2 * vocab  # two full row tiles
    assert len(buffers) == 1  # every tile in the one buffer
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), _reference(hidden, weight, targets), atol=1e-5, rtol=0)


def test_a_half_precision_head_is_tiled_too():
    torch.manual_seed(4)
    weight, hidden = (torch.randn(700, 16) * 0.5).bfloat16(), torch.randn(20, 16).bfloat16()
    targets = torch.randint(0, 700, (20,))
    got = tiled_target_logprobs(weight, hidden, targets, tile_rows=8, tile_vocab=128)
    logits = torch.nn.functional.linear(hidden, weight).double()  # the bf16 matmul, as compute_logits runs it
    expected = torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None])[:, 0]
    torch.testing.assert_close(got.double(), expected, atol=5e-2, rtol=0)


def test_the_tiled_gather_keeps_float32_accuracy_at_a_large_vocabulary():
    """The tiles' log-sum-exps are combined in float64: no error grows with the number of tiles."""
    torch.manual_seed(1)
    vocab, width = 151_936, 32
    weight, hidden = torch.randn(vocab, width) * 0.05, torch.randn(8, width)
    targets = torch.randint(0, vocab, (8,))
    got = tiled_target_logprobs(weight, hidden, targets)
    torch.testing.assert_close(got.double(), _reference(hidden, weight, targets), atol=2e-6, rtol=0)


class _Head(nn.Module):
    """A stand-in for a vLLM causal LM's head: ``compute_logits`` with an optional soft cap."""

    def __init__(self, weight: torch.Tensor, soft_cap: float | None = None) -> None:
        super().__init__()
        self.weight, self.soft_cap = weight, soft_cap

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = hidden @ self.weight.T
        return logits if self.soft_cap is None else torch.tanh(logits / self.soft_cap) * self.soft_cap


def test_a_head_that_changes_its_logits_outside_the_matmul_fails_the_probe():
    torch.manual_seed(2)
    weight, hidden = torch.randn(300, 8), torch.randn(6, 8) * 3
    assert agrees_with_compute_logits(weight, _Head(weight), hidden)
    assert not agrees_with_compute_logits(weight, _Head(weight, soft_cap=5.0), hidden)


@pytest.mark.parametrize("plain", [(True, True), (True, False)], ids=["all plain", "one not"])
def test_expert_heads_take_the_tiled_path_for_plain_heads_only_and_agree_either_way(monkeypatch, plain):
    torch.manual_seed(3)
    vocab, width, num_experts = 500, 8, 2
    models = [_Head(torch.randn(vocab, width)) for _ in range(num_experts)]
    monkeypatch.setattr(head_logprobs, "plain_head_weight",
                        lambda model: model.weight if plain[models.index(model)] else None)
    heads = ExpertHeads(num_experts, vocab, lambda k, h: h[:, k * width : (k + 1) * width], lambda k: models[k])
    hidden, targets = torch.randn(40, num_experts * width), torch.randint(0, vocab, (40,))
    assert heads(hidden[:0], targets[:0]).shape == (0, num_experts)  # no rows: nothing decided yet
    assert heads.plain_weights is None
    got = heads(hidden, targets)  # (40, K)
    assert [weight is not None for weight in heads.plain_weights] == list(plain)
    for k, model in enumerate(models):
        expected = _reference(hidden[:, k * width : (k + 1) * width], model.weight, targets)
        torch.testing.assert_close(got[:, k].double(), expected, atol=1e-5, rtol=0)
