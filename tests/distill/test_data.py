"""Batches drawn by domain weight: the gate's lambda, uniform or the data's proportions."""

from __future__ import annotations

import pytest
import torch
from distill_helpers import GATE_LAMBDA
from transformers import AutoTokenizer

from gatemix.distill.data import (
    BatchSampler,
    DistillDataError,
    WindowSet,
    domain_weights,
    train_windows,
)
from gatemix.distill.run import served_gate_lambda


@pytest.fixture(scope="module")
def windows(demo_project) -> WindowSet:
    tokenizer = AutoTokenizer.from_pretrained(demo_project.experts["code"])
    return train_windows(demo_project, tokenizer, seq_len=64)


def _domain_shares(sampler: BatchSampler, windows: WindowSet, draws: int = 4000) -> list[float]:
    window_ids, domains = sampler.sample(draws)
    assert torch.equal(windows.domain_ids()[window_ids], domains)  # each id is in its domain
    return (torch.bincount(domains, minlength=len(windows.domains)).float() / draws).tolist()


def test_lambda_weighting_changes_the_domain_mix_of_the_batches_as_asked(
        windows, lambda_composite):
    gate_lambda, gate = served_gate_lambda(lambda_composite)
    assert gate_lambda == pytest.approx(GATE_LAMBDA) and gate["method"] == "robust"
    weights = domain_weights("lambda", windows, gate_lambda)
    lambda_shares = _domain_shares(BatchSampler(windows, weights, seed=0), windows)
    assert lambda_shares == pytest.approx([GATE_LAMBDA[d] for d in windows.domains], abs=0.03)
    uniform = domain_weights("uniform", windows, gate_lambda)
    uniform_shares = _domain_shares(BatchSampler(windows, uniform, seed=0), windows)
    assert uniform_shares == pytest.approx([1 / 3] * 3, abs=0.03)
    proportional = domain_weights("proportional", windows, gate_lambda)
    assert proportional == pytest.approx([count / len(windows) for count in windows.counts])
    mixed = domain_weights("lambda", windows, gate_lambda, uniform_mix=0.5)
    assert mixed == pytest.approx([0.5 * GATE_LAMBDA[d] + 0.5 / 3 for d in windows.domains])


def test_lambda_without_a_fitted_gate_is_a_one_line_error(windows, composite_dir):
    gate_lambda, _ = served_gate_lambda(composite_dir)  # the uniform pack: no fit, no lambda
    assert gate_lambda is None
    with pytest.raises(DistillDataError, match="no fitted lambda") as error:
        domain_weights("lambda", windows, gate_lambda, "p.toml")
    assert "\n" not in str(error.value)


def test_a_weighted_domain_without_windows_is_an_empty_dataset_error(windows):
    empty = WindowSet(windows.domains, {**windows.windows,
                                        "legal": windows.windows["legal"][:0]})
    with pytest.raises(DistillDataError, match="'legal'.*empty dataset"):
        domain_weights("uniform", empty, None)
    assert domain_weights("lambda", empty, {"code": 0.5, "legal": 0.0, "docs": 0.5})[1] == 0


def test_a_run_samples_by_the_served_gates_lambda(tiny_config, lambda_composite):
    from gatemix.distill.train import distill, read_record

    record = read_record(distill(tiny_config(composite_dir=str(lambda_composite), steps=1,
                                             eval_every=0, domain_weights="lambda")))
    assert record["domain_weights"]["weights"] == pytest.approx(GATE_LAMBDA)


def test_the_sampler_replays_its_batches_from_its_saved_state(windows):
    sampler = BatchSampler(windows, [0.5, 0.25, 0.25], seed=3)
    sampler.sample(8)
    state = sampler.state_dict()
    ahead = [sampler.sample(8)[0] for _ in range(3)]
    replay = BatchSampler(windows, [0.5, 0.25, 0.25], seed=99)
    replay.load_state_dict(state)
    assert all(torch.equal(a, replay.sample(8)[0]) for a in ahead)
