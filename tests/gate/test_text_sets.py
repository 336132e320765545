"""Switching documents and the per-segment oracle: built deterministically from token streams."""

from __future__ import annotations

import torch

from gatemix.gate.fit.text_sets import segment_oracle_logprobs, switching_sequences
from gatemix.gate.token_features import TokenFeatures

STREAMS = [list(range(300)), list(range(1000, 1300)), list(range(2000, 2300))]


def _build(seed: int):
    return switching_sequences(STREAMS, count=20, length=33, seed=seed, start_token=7)


def test_switching_documents_are_built_the_same_from_the_same_seed():
    first, again, other = _build(0), _build(0), _build(1)
    assert first.token_lists == again.token_lists and first.segment_domains == again.segment_domains
    assert first.token_lists != other.token_lists


def test_each_switching_document_is_runs_of_two_or_three_distinct_domains():
    built = _build(0)
    for ids, domains in zip(built.token_lists, built.segment_domains):
        assert ids[0] == 7 and len(ids) == 33 and len(domains) == 32
        runs = [d for i, d in enumerate(domains) if i == 0 or d != domains[i - 1]]
        assert 2 <= len(runs) <= 3 and len(set(runs)) == len(runs)  # each domain once, contiguous
        for token, domain in zip(ids[1:], domains):
            assert token // 1000 == domain  # every token came from its own domain's stream
    assert {len(set(d)) for d in built.segment_domains} == {2, 3}


def test_the_segment_oracle_scores_every_token_with_its_own_domain_expert():
    built = switching_sequences(STREAMS, count=3, length=9, seed=2, start_token=0)
    width = 8
    next_logprobs = torch.arange(3.0).expand(3, width, 3).neg()  # expert k always gives -k
    features = TokenFeatures(
        torch.zeros(3, width + 1, dtype=torch.long), torch.ones(3, width + 1, dtype=torch.long),
        next_logprobs, None, torch.ones(3, width),
    )
    oracle = segment_oracle_logprobs(features, built)
    expected = -torch.tensor(built.segment_domains, dtype=torch.float32)
    torch.testing.assert_close(oracle, expected)
