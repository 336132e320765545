"""The serve bench's ratios, table, plot and CLI parsing, from a fake results dict."""

import argparse

import pytest
from gatemix.bench.serve_bench import (
    ServeBenchConfig,
    add_serve_bench_parser,
    compute_ratios,
    format_serve_bench,
    plot_serve_bench,
)

from gatemix.cli import UserError


def _point(system, concurrency, tps, prompt_len=32):
    return {"system": system, "concurrency": concurrency, "prompt_len": prompt_len, "output_tps": tps,
            "ttft_p50_ms": 10.0, "ttft_p99_ms": 20.0, "itl_p50_ms": 1.5, "itl_p99_ms": 3.25, "peak_rss_mib": 2048.0}


def _fake_result():
    points = [
        _point("ensemble", 1, 300.0), _point("single", 1, 700.0), _point("vllm", 1, 750.0),
        _point("lockstep", 1, 10.0),
        _point("ensemble", 16, 900.0), _point("single", 16, 2000.0), _point("vllm", 16, 2000.0),
        _point("lockstep", 16, 30.0),
        _point("ensemble", 64, 1000.0), _point("single", 64, 2400.0), _point("vllm", 64, 2500.0),
    ]
    config = ServeBenchConfig(composite_dir="c", expert_dirs=["a", "b"], concurrencies=(1, 16, 64), prompt_lens=(32,))
    from dataclasses import asdict

    return {"config": asdict(config), "num_experts": 2, "points": points, "ratios": compute_ratios(points, 2),
            "notes": ["lockstep: c=64 p=32 skipped (above --lockstep-max-concurrency 16)"]}


def test_ratios_are_efficiency_overhead_and_speedup_per_point():
    ratios = {r["concurrency"]: r for r in _fake_result()["ratios"]}
    assert ratios[16]["efficiency_E"] == pytest.approx(2 * 900 / 2000)
    assert ratios[16]["server_overhead"] == pytest.approx(1.0)
    assert ratios[16]["speedup_over_lockstep"] == pytest.approx(30.0)
    assert ratios[64]["speedup_over_lockstep"] is None  # lockstep skipped there


def test_table_has_one_row_per_point_the_ratios_and_the_notes():
    report = format_serve_bench(_fake_result())
    rows = [line for line in report.splitlines() if line.startswith(("| gatemix", "| vllm", "| lockstep"))]
    assert len(rows) == 11
    assert "| gatemix ensemble (K experts) | 16 | 32 | 900.0 | 10.0 | 20.0 | 1.50 | 3.25 | 2048 |" in report
    assert "| 16 | 32 | 0.900 | 1.000 | 30.0x |" in report
    assert "| 64 | 32 | 0.833 | 0.960 | n/a |" in report
    assert "skipped (above --lockstep-max-concurrency 16)" in report


def test_plot_writes_a_png(tmp_path):
    path = tmp_path / "serve.png"
    plot_serve_bench(_fake_result(), path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _parse(argv):
    parser = argparse.ArgumentParser()
    add_serve_bench_parser(parser.add_subparsers())
    return parser.parse_args(["serve", *argv])


def test_missing_demo_folder_is_a_one_line_user_error(tmp_path):
    args = _parse(["--demo-dir", str(tmp_path / "nothing")])
    with pytest.raises(UserError, match="not found"):
        args.run(args)


def test_bad_concurrency_list_is_a_user_error():
    from gatemix.bench.serve_bench import _int_list

    with pytest.raises(UserError, match="--concurrency"):
        _int_list("1,x", "--concurrency")
    with pytest.raises(UserError):
        _int_list("0", "--concurrency")


def test_unknown_system_is_rejected():
    with pytest.raises(ValueError, match="unknown systems"):
        ServeBenchConfig(composite_dir="c", expert_dirs=["a"], systems=("ensemble", "tgi"))


def test_a_repeated_point_keeps_its_median_run_and_every_figure():
    from gatemix.bench.serve_bench import _tps_cell, median_point

    runs = [
        {"output_tps": 900.0, "ttft_p50_ms": 9.0, "peak_rss_mib": 100.0},
        {"output_tps": 300.0, "ttft_p50_ms": 3.0, "peak_rss_mib": 300.0},
        {"output_tps": 600.0, "ttft_p50_ms": 6.0, "peak_rss_mib": 200.0},
    ]
    point = median_point(runs)
    assert point["output_tps"] == 600.0 and point["ttft_p50_ms"] == 6.0  # one run's figures, not a mix
    assert point["output_tps_runs"] == [900.0, 300.0, 600.0]
    assert point["peak_rss_mib"] == 300.0
    assert _tps_cell(point) == "600.0 (300-900)"
    assert _tps_cell(median_point(runs[:1])) == "900.0"
