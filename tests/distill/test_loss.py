"""Invariants of the distillation losses and the top-k (tail bucket) targets on tiny tensors."""

import pytest
import torch
import torch.nn.functional as F

from gatemix.distill.acceptance import acceptance_probability
from gatemix.distill.loss import (
    distillation_loss,
    generalized_jsd_loss,
    per_token_divergence,
    teacher_targets,
    top_k_with_tail,
    total_variation,
)


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


# ---- the top-k teacher with a tail bucket ----


@pytest.mark.parametrize("beta", [0.0, 0.4, 1.0])
def test_top_k_equal_to_the_vocabulary_equals_the_exact_loss_and_gradient(beta):
    teacher = torch.log_softmax(_logits(9), -1)
    exact_logits = _logits(10).requires_grad_(True)
    bucket_logits = exact_logits.detach().clone().requires_grad_(True)
    exact = generalized_jsd_loss(exact_logits, teacher, beta=beta)
    bucketed = distillation_loss(bucket_logits, top_k_with_tail(teacher, 7), beta=beta)
    torch.testing.assert_close(bucketed, exact)
    exact.backward()
    bucketed.backward()
    assert torch.isfinite(bucket_logits.grad).all()
    torch.testing.assert_close(bucket_logits.grad, exact_logits.grad)


def test_tail_bucket_keeps_the_teachers_whole_mass():
    targets = top_k_with_tail(torch.log_softmax(_logits(11), -1), 3)
    assert targets.indices.shape == (2, 3, 3) and targets.logprobs.shape == (2, 3, 4)
    torch.testing.assert_close(targets.logprobs.exp().sum(-1), torch.ones(2, 3))


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_top_k_divergence_is_a_lower_bound_of_the_full_one(beta):
    student, teacher = _logits(12), torch.log_softmax(_logits(13), -1)
    full = generalized_jsd_loss(student, teacher, beta=beta)
    for k in (1, 3, 6):
        assert distillation_loss(student, top_k_with_tail(teacher, k), beta=beta) <= full + 1e-6


def test_identical_distributions_give_zero_top_k_loss():
    logits = _logits(14)
    assert distillation_loss(logits, top_k_with_tail(torch.log_softmax(logits, -1), 2)).abs() < 1e-6


def test_targets_are_dense_when_k_is_zero_or_covers_the_vocabulary():
    teacher = torch.log_softmax(_logits(15), -1)
    for k in (0, 7, 100):
        assert teacher_targets(teacher, k).is_dense
    assert not teacher_targets(teacher, 6).is_dense


# ---- total variation (--loss tv) ----


def test_total_variation_is_zero_for_equal_distributions_dense_and_top_k():
    logits = _logits(16)
    teacher = torch.log_softmax(logits, -1)
    assert distillation_loss(logits, teacher_targets(teacher, 0), kind="tv").abs() < 1e-6
    assert distillation_loss(logits, top_k_with_tail(teacher, 2), kind="tv").abs() < 1e-6


def test_total_variation_matches_a_hand_computation():
    student = torch.tensor([0.5, 0.3, 0.2]).log()
    teacher = torch.tensor([0.2, 0.3, 0.5]).log()
    # 0.5 * (|0.5 - 0.2| + 0 + |0.2 - 0.5|) = 0.3
    torch.testing.assert_close(total_variation(student, teacher), torch.tensor(0.3))
    # top-1 of the teacher (token 2, 0.5) and a tail of 0.5; the student 0.2 and 0.8:
    # 0.5 * (0.3 + 0.3) = 0.3 as well; the top-k TV is a lower bound of the full one
    targets = top_k_with_tail(teacher[None, None], 1)
    bucketed = per_token_divergence(student[None, None], targets, beta=0.0, kind="tv")
    torch.testing.assert_close(bucketed, torch.tensor([[0.3]]))


def test_total_variation_is_one_minus_the_draft_acceptance_probability():
    student, teacher = _logits(17), torch.log_softmax(_logits(18), -1)
    tv = per_token_divergence(student, teacher_targets(teacher, 0), beta=0.0, kind="tv")
    alpha = acceptance_probability(teacher, torch.log_softmax(student, -1))
    torch.testing.assert_close(tv, 1 - alpha)


def test_total_variation_dense_and_top_k_covering_the_vocabulary_agree_with_finite_gradients():
    teacher = torch.log_softmax(_logits(19), -1)
    teacher[0, 0, 3] = float("-inf")  # a zero-mass teacher token
    teacher = torch.log_softmax(teacher, -1)
    dense_logits = _logits(20).requires_grad_(True)
    bucket_logits = dense_logits.detach().clone().requires_grad_(True)
    dense = distillation_loss(dense_logits, teacher_targets(teacher, 0), kind="tv")
    bucketed = distillation_loss(bucket_logits, top_k_with_tail(teacher, 7), kind="tv")
    torch.testing.assert_close(bucketed, dense)
    dense.backward()
    bucketed.backward()
    assert torch.isfinite(dense_logits.grad).all() and dense_logits.grad.abs().sum() > 0
    torch.testing.assert_close(bucket_logits.grad, dense_logits.grad)
    for k in (1, 3, 6):
        assert distillation_loss(dense_logits, top_k_with_tail(teacher, k), kind="tv") <= dense + 1e-6


def test_an_unknown_divergence_kind_is_refused():
    with pytest.raises(ValueError, match="kind"):
        distillation_loss(_logits(21), teacher_targets(torch.log_softmax(_logits(22), -1), 0),
                          kind="hellinger")
