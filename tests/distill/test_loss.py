"""Invariants of the distillation loss on tiny tensors."""

import pytest
import torch
import torch.nn.functional as F

from gatemix.distill.loss import generalized_jsd_loss


def _logits(seed, shape=(2, 3, 7)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 2


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
def test_identical_distributions_give_zero_loss(beta):
    logits = _logits(0)
    loss = generalized_jsd_loss(logits, torch.log_softmax(logits, -1), beta=beta)
    assert abs(loss.item()) < 1e-6


def test_beta_zero_is_forward_kl_and_beta_one_is_reverse_kl():
    student, teacher = _logits(1), torch.log_softmax(_logits(2), -1)
    student_logprobs = torch.log_softmax(student, -1)
    forward = F.kl_div(student_logprobs, teacher, log_target=True, reduction="none").sum(-1).mean()
    reverse = F.kl_div(teacher, student_logprobs, log_target=True, reduction="none").sum(-1).mean()
    torch.testing.assert_close(generalized_jsd_loss(student, teacher, beta=0.0), forward)
    torch.testing.assert_close(generalized_jsd_loss(student, teacher, beta=1.0), reverse)


def test_jsd_is_bounded_by_log_two_and_positive():
    loss = generalized_jsd_loss(_logits(3) * 20, torch.log_softmax(_logits(4) * 20, -1), beta=0.5)
    assert 0 < loss.item() <= torch.log(torch.tensor(2.0)).item() + 1e-6


def test_teacher_zero_mass_tokens_are_handled():
    teacher = torch.log_softmax(_logits(5), -1)
    teacher[..., 0] = float("-inf")
    teacher = torch.log_softmax(teacher, -1)
    loss = generalized_jsd_loss(_logits(6), teacher, beta=0.0)
    assert torch.isfinite(loss)


def test_mask_excludes_positions():
    student, teacher = _logits(7), torch.log_softmax(_logits(8), -1)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    manual = generalized_jsd_loss(student[mask.bool()][None], teacher[mask.bool()][None])
    torch.testing.assert_close(generalized_jsd_loss(student, teacher, mask), manual)
