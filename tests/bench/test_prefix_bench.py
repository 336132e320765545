"""The prefix bench's workload and report (its engine runs are benchmarks, not tests)."""

from __future__ import annotations

from gatemix.bench.prefix_bench import PrefixBenchConfig, format_prefix_bench, shared_prefix_prompts


def test_prompts_share_the_prefix_and_differ_in_their_tails():
    config = PrefixBenchConfig(prefix_len=20, tail_len=4, requests=5, rounds=2)
    rounds = shared_prefix_prompts(100, config)
    prompts = [prompt for round_prompts in rounds for prompt in round_prompts]
    assert len(rounds) == 2 and len(prompts) == 10 and all(len(p) == 24 for p in prompts)
    assert len({tuple(p[:20]) for p in prompts}) == 1
    assert len({tuple(p[20:]) for p in prompts}) == 10
    assert all(16 <= token < 100 for p in prompts for token in p)


def test_the_report_gives_the_ratios_the_issue_asks_for():
    result = {
        "config": {"requests": 32, "prefix_len": 900, "tail_len": 16, "concurrency": 4, "output_len": 8,
                   "dtype": "float32", "rounds": 1},
        "mean_ttft_ms": {"posterior composite, caching on": 100.0, "posterior composite, caching off": 800.0,
                         "hidden-state-router composite, caching on": 90.0, "one expert, caching on": 50.0},
        "mean_ttft_ms_per_round": {"posterior composite, caching on": [100.0], "posterior composite, caching off": [800.0],
                                   "hidden-state-router composite, caching on": [90.0], "one expert, caching on": [50.0]},
        "ratios": {"caching_speedup": 8.0, "vs_hidden_state_router": 100 / 90, "vs_one_expert": 2.0},
    }
    report = format_prefix_bench(result)
    assert "8.00x faster" in report and "1.11x the hidden-state router's" in report
