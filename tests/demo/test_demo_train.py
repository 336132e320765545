"""The pure pieces of training: schedule, windows, eval loss."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from gatemix.demo.train import (
    LlamaShape,
    count_parameters,
    eval_loss,
    eval_windows,
    llama_config,
    lr_factor,
    new_model,
    sample_windows,
)


def test_lr_warms_up_linearly_then_decays_to_the_floor():
    factors = [lr_factor(step, total_steps=100, warmup_steps=10, min_ratio=0.1)
               for step in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(factors[9:]))
    assert lr_factor(100, total_steps=100, warmup_steps=10, min_ratio=0.1) == pytest.approx(0.1)


def test_sampled_windows_are_contiguous_slices():
    stream = torch.arange(100)
    windows = sample_windows(stream, 8, 16, torch.Generator().manual_seed(0))
    assert windows.shape == (8, 16)
    assert torch.equal(windows[:, 1:] - windows[:, :-1], torch.ones(8, 15, dtype=torch.long))
    assert int(windows.max()) < 100


def test_eval_windows_are_fixed_and_capped():
    assert eval_windows(torch.arange(100), seq_len=16, max_tokens=50).shape == (3, 16)
    assert eval_windows(torch.arange(10), seq_len=16, max_tokens=50).shape == (1, 10)


def test_an_untrained_model_scores_near_uniform():
    config = llama_config(LlamaShape(32, 1, 1, 1, 64), vocab_size=300, context_length=64)
    model = new_model(config, seed=0)
    assert config.tie_word_embeddings is False
    assert count_parameters(model) > 2 * 300 * 32
    loss = eval_loss(model, torch.randint(0, 300, (5, 16)), batch_size=2)
    assert loss == pytest.approx(math.log(300), abs=0.3)
