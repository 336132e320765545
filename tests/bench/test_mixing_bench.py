"""``gatemix bench mixing`` measures forms that agree: same mixture, timings side by side."""

from __future__ import annotations

from gatemix.bench.mixing_bench import MixingShape, format_mixing_bench, run_mixing_bench


def test_mixing_bench_times_three_forms_of_the_same_mixture():
    rows = run_mixing_bench((MixingShape(4, 3, 257),), repeats=2, rounds=1)
    (row,) = rows
    assert row["max_abs_difference"] < 1e-4
    assert min(row["two_pass_ms"], row["fused_ms"], row["compiled_ms"]) > 0
    table = format_mixing_bench(rows)
    assert "| 4 | 3 | 257 | float32 |" in table
