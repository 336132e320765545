"""Paired timing of two engines (``bench/engine_timing.py``): the arithmetic, on recorded outputs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from gatemix.bench import engine_timing
from gatemix.bench.engine_timing import (
    TimedRun,
    best_run,
    best_runs,
    decode_tokens_per_second,
    paired_figures,
)


def _output(tokens: int, first: float, last: float, with_stats: bool = True):
    stats = SimpleNamespace(first_token_ts=first, last_token_ts=last) if with_stats else None
    return SimpleNamespace(outputs=[SimpleNamespace(token_ids=list(range(tokens)))], metrics=stats)


def test_decode_rate_leaves_out_each_requests_first_token_and_adds_requests():
    # Two requests decoding together: 9 tokens after the first in 3 s, 4 in 2 s.
    outputs = [_output(10, first=100.0, last=103.0), _output(5, first=100.5, last=102.5)]
    assert decode_tokens_per_second(outputs) == pytest.approx(9 / 3 + 4 / 2)


@pytest.mark.parametrize("outputs", [
    [_output(10, 1.0, 2.0, with_stats=False)],  # the engine logged no stats
    [_output(1, 1.0, 1.0)],  # nothing after the first token
    [_output(10, 0.0, 2.0)],  # no first-token time
    [],
])
def test_decode_rate_is_none_without_what_it_needs(outputs):
    assert decode_tokens_per_second(outputs) is None


def test_paired_figures_are_per_round_ratios_and_their_medians():
    rounds = [(TimedRun(100.0, 200.0), TimedRun(90.0, 196.0)),
              (TimedRun(50.0, 100.0), TimedRun(60.0, 99.0)),
              (TimedRun(80.0, None), TimedRun(40.0, 150.0))]
    figures = paired_figures(rounds)
    assert figures["ratios"] == pytest.approx([0.9, 1.2, 0.5])
    assert figures["ratio"] == pytest.approx(0.9)
    assert figures["decode_ratios"] == pytest.approx([0.98, 0.99])  # the round without a baseline rate left out
    assert figures["decode_ratio"] == pytest.approx(0.985)
    assert (figures["baseline"], figures["candidate"]) == (100.0, 90.0)
    best = best_runs({4: figures}, "candidate")[4]
    assert best == TimedRun(90.0, 196.0)
    assert best_runs({4: figures}, "baseline")[4] == TimedRun(100.0, 200.0)


def test_a_best_run_takes_each_figure_s_own_best():
    """The fastest whole run need not have the fastest decode; a run without timestamps adds none."""
    assert best_run([TimedRun(10.0, 5.0), TimedRun(8.0, 9.0), TimedRun(12.0, None)]) == TimedRun(12.0, 9.0)
    assert best_run([TimedRun(3.0, None)]) == TimedRun(3.0, None)


def test_paired_runs_alternate_the_engines_on_the_same_requests(monkeypatch):
    calls = []

    def fake_timed_run(llm, requests, params):
        calls.append((llm, tuple(r["id"] for r in requests)))
        return TimedRun(10.0 if llm == "base" else 5.0, None)

    monkeypatch.setattr(engine_timing, "timed_run", fake_timed_run)
    paired = engine_timing.paired_runs("base", "cand", lambda count: [{"id": i} for i in range(count)], None,
                                       concurrencies=(1, 3), repeats=2)
    assert [llm for llm, _ in calls] == ["base", "cand"] * 4
    assert [ids for _, ids in calls] == [(0,)] * 4 + [(0, 1, 2)] * 4
    assert paired[3]["ratio"] == 0.5 and paired[3]["decode_ratio"] is None
