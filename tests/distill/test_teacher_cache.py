"""The teacher's targets: exact at full k, scored once per window, refused when corrupt."""

from __future__ import annotations

import pytest
import torch

from gatemix.distill.data import WindowSet
from gatemix.distill.loss import top_k_with_tail
from gatemix.distill.teacher import EnsembleTeacher
from gatemix.distill.teacher_cache import TeacherCache, TeacherCacheError, TeacherTargetSource


class CountingTeacher:
    """A stand-in for the ensemble (pure logic test): log-probs from a fixed table, calls counted."""

    def __init__(self, vocab_size: int = 11) -> None:
        self.table = torch.log_softmax(torch.randn(vocab_size, vocab_size,
                                                   generator=torch.Generator().manual_seed(0)), -1)
        self.rows_scored = 0

    def __call__(self, input_ids):
        self.rows_scored += input_ids.shape[0]
        return self.table[input_ids], None


def _windows(num: int = 6, seq_len: int = 5) -> WindowSet:
    ids = torch.arange(num * seq_len).remainder(11).view(num, seq_len)
    return WindowSet(["a", "b"], {"a": ids[:4], "b": ids[4:]})


@pytest.mark.parametrize("top_k", [0, 3])
def test_cached_targets_serve_a_rerun_without_running_the_teacher(tmp_path, top_k):
    windows, teacher = _windows(), CountingTeacher()
    cache = TeacherCache.create(tmp_path / "c", num_windows=len(windows), seq_len=5,
                                vocab_size=11, top_k=top_k)
    source = TeacherTargetSource(teacher, top_k, cache)
    ids = torch.tensor([4, 1, 4, 2])
    first = source.for_windows(ids, windows.batch(ids))
    assert teacher.rows_scored == 3  # window 4 scored once although drawn twice
    rerun = TeacherTargetSource(teacher, top_k, TeacherCache.open(tmp_path / "c"))
    again = rerun.for_windows(ids, windows.batch(ids))
    assert teacher.rows_scored == 3 and rerun.scored_windows == 0
    torch.testing.assert_close(again.logprobs, first.logprobs, rtol=0, atol=0)
    expected = source.live(windows.batch(ids))
    torch.testing.assert_close(first.logprobs, expected.logprobs)
    assert cache.filled_count() == 3


def test_top_k_teacher_with_k_equal_to_the_vocabulary_equals_the_exact_one(
        demo_paths, composite_dir):
    teacher = EnsembleTeacher.load(composite_dir, list(demo_paths.expert_dirs.values()))
    input_ids = torch.arange(2 * 24).view(2, 24) * 37 % 2000
    exact, _ = teacher(input_ids)  # (B, T, V)
    vocab_size = exact.shape[-1]
    targets = top_k_with_tail(exact, vocab_size)
    assert targets.logprobs[..., -1].exp().max() == 0  # the tail holds nothing
    rebuilt = torch.full_like(exact, float("-inf")).scatter(-1, targets.indices,
                                                            targets.logprobs[..., :-1])
    torch.testing.assert_close(rebuilt, exact, rtol=0, atol=0)
    dense = TeacherTargetSource(teacher, vocab_size).live(input_ids)
    assert dense.is_dense
    torch.testing.assert_close(dense.logprobs, exact, rtol=0, atol=0)


def test_a_corrupt_teacher_cache_is_a_one_line_error(tmp_path):
    TeacherCache.create(tmp_path / "c", num_windows=2, seq_len=5, vocab_size=11, top_k=0)
    (tmp_path / "c" / "logprobs.npy").write_bytes(b"not numpy")
    with pytest.raises(TeacherCacheError, match="unreadable teacher cache") as error:
        TeacherCache.open(tmp_path / "c")
    assert "\n" not in str(error.value)
