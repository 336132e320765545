"""The serve bench's ratios, table, plot and CLI parsing, from a fake results dict."""

import argparse

import pytest

from gatemix.bench.serve_bench import ServeBenchConfig, add_serve_bench_parser
from gatemix.bench.serve_report import (
    _tps_cell,
    compute_ratios,
    draft_acceptance,
    format_serve_bench,
    median_point,
    plot_serve_bench,
)
from gatemix.errors import UserError


def _point(system, concurrency, tps, prompt_len=32, api_cpu=200.0):
    return {"system": system, "concurrency": concurrency, "prompt_len": prompt_len, "output_tps": tps,
            "ttft_p50_ms": 10.0, "ttft_p99_ms": 20.0, "itl_p50_ms": 1.5, "itl_p99_ms": 3.25,
            "api_cpu_us_per_token": api_cpu, "peak_rss_mib": 2048.0}


def _fake_result():
    points = [
        _point("ensemble", 1, 300.0), _point("single", 1, 700.0), _point("vllm", 1, 750.0),
        _point("lockstep", 1, 10.0),
        _point("ensemble", 16, 900.0), _point("single", 16, 2000.0, api_cpu=150.0), _point("vllm", 16, 2000.0),
        _point("lockstep", 16, 30.0), _point("student", 16, 2400.0), _point("uniform", 16, 1000.0),
        {**_point("draft", 16, 450.0), "mean_acceptance_length": 2.25, "acceptance_rate": 0.41},
        _point("ensemble", 64, 1000.0), _point("single", 64, 2400.0), _point("vllm", 64, 2500.0),
    ]
    config = ServeBenchConfig(concurrency=(1, 16, 64), prompt_lens=(32,))
    from dataclasses import asdict

    return {"config": asdict(config), "num_experts": 2, "points": points, "ratios": compute_ratios(points, 2),
            "notes": ["lockstep: c=64 p=32 skipped (above --lockstep-max-concurrency 16)"]}


def test_ratios_are_efficiency_overhead_and_speedup_per_point():
    ratios = {r["concurrency"]: r for r in _fake_result()["ratios"]}
    assert ratios[16]["efficiency_E"] == pytest.approx(2 * 900 / 2000)
    assert ratios[16]["server_overhead"] == pytest.approx(1.0)
    assert ratios[16]["api_cpu_overhead"] == pytest.approx(200.0 / 150.0)  # gatemix's API spends less
    assert ratios[16]["speedup_over_lockstep"] == pytest.approx(30.0)
    assert ratios[64]["speedup_over_lockstep"] is None  # lockstep skipped there
    assert ratios[16]["student_speedup"] == pytest.approx(2400.0 / 900.0)
    assert ratios[1]["student_speedup"] is None  # no student point there
    assert ratios[16]["draft_speedup"] == pytest.approx(450.0 / 900.0)
    assert ratios[64]["draft_speedup"] is None
    assert ratios[16]["gate_cost"] == pytest.approx(900.0 / 1000.0)  # the served gate against a uniform one
    assert ratios[1]["gate_cost"] is None


def test_draft_acceptance_is_the_point_s_share_of_vllm_s_totals():
    before = {"vllm:spec_decode_num_drafts": 10, "vllm:spec_decode_num_draft_tokens": 30,
              "vllm:spec_decode_num_accepted_tokens": 12}
    after = {"vllm:spec_decode_num_drafts": 30, "vllm:spec_decode_num_draft_tokens": 90,
             "vllm:spec_decode_num_accepted_tokens": 42}
    assert draft_acceptance(before, after) == {"acceptance_rate": 0.5, "mean_acceptance_length": 2.5}
    assert draft_acceptance({}, {}) == {}  # no draft: nothing to report


def test_table_has_one_row_per_point_the_ratios_and_the_notes():
    report = format_serve_bench(_fake_result())
    rows = [line for line in report.splitlines() if line.startswith(("| gatemix", "| vllm", "| lockstep"))]
    assert len(rows) == 14
    assert "| gatemix ensemble (K experts) | 16 | 32 | 900.0 | 10.0 | 20.0 | 1.50 | 3.25 | 200 | 2048 |" in report
    assert "| 16 | 32 | 0.900 | 1.000 | 1.333 | 30.0x | 2.67x | 0.50x | 2.25 | 0.900x |" in report
    assert "| 64 | 32 | 0.833 | 0.960 | 1.000 | n/a | n/a | n/a | n/a | n/a |" in report
    assert "skipped (above --lockstep-max-concurrency 16)" in report


def test_plot_writes_a_png(tmp_path):
    path = tmp_path / "serve.png"
    plot_serve_bench(_fake_result(), path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _parse(argv):
    parser = argparse.ArgumentParser()
    add_serve_bench_parser(parser.add_subparsers())
    return parser.parse_args(["serve", *argv])


def _one_line_user_error(argv) -> str:
    args = _parse(argv)
    with pytest.raises(UserError) as error:
        args.run(args)
    message = str(error.value)
    assert "\n" not in message
    return message


def test_missing_project_is_a_one_line_user_error(tmp_path):
    assert "does not exist" in _one_line_user_error(["--project", str(tmp_path / "nothing")])
    assert "no project file" in _one_line_user_error(["--project", str(tmp_path)])


def test_missing_composite_and_student_folders_are_one_line_user_errors(tmp_path, tiny_project):
    project = str(tiny_project)
    message = _one_line_user_error(["--project", project, "--composite", str(tmp_path / "nothing")])
    assert "not found" in message
    message = _one_line_user_error(["--project", project, "--student", str(tmp_path / "nothing")])
    assert "student folder" in message and "not found" in message


def test_bad_concurrency_is_rejected(capsys):
    assert "concurrency" in _one_line_user_error(["--concurrency", "1", "0"])
    with pytest.raises(SystemExit) as exit_info:  # not an integer: argparse's own error, exit 2
        _parse(["--concurrency", "1", "x"])
    assert exit_info.value.code == 2
    assert "--concurrency" in capsys.readouterr().err


def test_concurrency_and_prompt_lens_take_several_integers():
    from gatemix.config_cli import config_from_args

    args = _parse(["--concurrency", "1", "16", "--prompt-lens", "32", "--systems", "single", "vllm"])
    config = config_from_args(args, ServeBenchConfig)
    assert config.concurrency == (1, 16) and config.prompt_lens == (32,)
    assert config.systems == ("single", "vllm") and config.output_len == 128


def test_unknown_system_is_rejected():
    with pytest.raises(ValueError, match="unknown systems"):
        ServeBenchConfig(systems=("ensemble", "tgi"))


def test_a_repeated_point_keeps_its_median_run_and_every_figure():
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


def _rounds(system, tps_runs, cpu_runs=None):
    runs = [dict(_point(system, 16, tps), api_cpu_us_per_token=cpu)
            for tps, cpu in zip(tps_runs, cpu_runs or [200.0] * len(tps_runs))]
    return median_point(runs)


def test_repeated_rounds_pair_each_round_before_taking_the_median():
    # Per-round ratios 2.0, 0.4 and 2000/1900; the medians' ratio (1000 / 1000) would be 1.0.
    single = _rounds("single", [1000.0, 400.0, 2000.0])
    vllm = _rounds("vllm", [500.0, 1000.0, 1900.0])
    ratio = compute_ratios([single, vllm], 3)[0]
    assert ratio["server_overhead"] == pytest.approx(2000.0 / 1900.0)
    assert ratio["server_overhead_range"] == pytest.approx([0.4, 2.0])
    report = format_serve_bench({
        "config": {"output_len": 128, "dtype": "float32", "seed": 0, "repeats": 3},
        "num_experts": 3, "points": [single, vllm], "ratios": [ratio], "notes": []})
    assert "| 16 | 32 | n/a | 1.053 (0.400-2.000) | 1.000 (1.000-1.000) | n/a |" in report
    assert "median over rounds" in report


def test_api_cpu_overhead_is_vllm_cost_over_gatemix_cost_per_round():
    single = _rounds("single", [1000.0, 1000.0, 1000.0], cpu_runs=[100.0, 120.0, 300.0])
    vllm = _rounds("vllm", [1000.0, 1000.0, 1000.0], cpu_runs=[110.0, 120.0, 150.0])
    ratio = compute_ratios([single, vllm], 3)[0]
    assert ratio["api_cpu_overhead"] == pytest.approx(1.0)  # median of 1.1, 1.0, 0.5
    assert ratio["api_cpu_overhead_range"] == pytest.approx([0.5, 1.1])


def test_rounds_that_do_not_pair_fall_back_to_the_medians():
    single = _rounds("single", [900.0, 1000.0, 1100.0])
    vllm = _rounds("vllm", [800.0, 1000.0])  # one vllm run failed
    ratio = compute_ratios([single, vllm], 3)[0]
    assert ratio["server_overhead"] == pytest.approx(1000.0 / 800.0)  # median runs: 1000 and the lower of two
    assert ratio["server_overhead_range"] is None


@pytest.mark.parametrize("field", ["num_prompts", "lockstep_num_prompts"])
@pytest.mark.parametrize("count", [0, -3])
def test_a_request_count_below_one_is_rejected_not_replaced_by_the_default(field, count):
    with pytest.raises(ValueError, match="must be positive"):
        ServeBenchConfig(**{field: count})
    flag = "--" + field.replace("_", "-")
    assert "must be positive" in _one_line_user_error([flag, str(count)])


def test_the_student_defaults_to_the_projects_when_it_has_a_config(tmp_path, tiny_project):
    import dataclasses
    import shutil

    from gatemix.bench.serve_bench import serve_bench_models
    from gatemix.project import load_project

    project = load_project(tiny_project, check_data=False)
    config = ServeBenchConfig(project=str(tiny_project), prompt_lens=(32,), output_len=16)
    shutil.rmtree(project.student_dir, ignore_errors=True)
    models = serve_bench_models(config)
    assert models.student_dir is None and models.composite_dir == project.composite_dir
    assert [p.name for p in models.expert_dirs] == ["llama-0", "qwen2-1"]
    shutil.copytree(models.expert_dirs[0], project.student_dir)
    try:
        assert serve_bench_models(config).student_dir == project.student_dir
        explicit = dataclasses.replace(config, student=str(models.expert_dirs[1]))
        assert serve_bench_models(explicit).student_dir == models.expert_dirs[1]
    finally:
        shutil.rmtree(project.student_dir)


def test_prompt_and_output_beyond_the_experts_context_are_refused(tiny_project):
    from gatemix.bench.serve_bench import serve_bench_models

    config = ServeBenchConfig(project=str(tiny_project), prompt_lens=(32, 512))
    with pytest.raises(UserError, match="exceed the experts' context of 256"):
        serve_bench_models(config)
