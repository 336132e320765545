"""``gatemix distill-report``: every model on the same eval windows, the target check, a generation check."""

from __future__ import annotations

import json

from gatemix.cli import main
from gatemix.project import load_project


def test_distill_report_compares_the_student_with_the_ensemble_baselines_and_experts(
        tiny_student, demo_paths, composite_dir, tmp_path, capsys):
    out = tmp_path / "report"
    code = main(["distill-report", "--project", str(demo_paths.project_file),
                 "--student", str(tiny_student), "--composite-dir", str(composite_dir),
                 "--compare", f"base={demo_paths.root / 'base'}", "--out-dir", str(out),
                 "--eval-tokens", "256", "--prompts-per-domain", "2", "--prompt-tokens", "8",
                 "--new-tokens", "6"])
    assert code == 0, capsys.readouterr().err[-2000:]
    text = (out / "report.md").read_text()
    baselines = [f"| {name} |" for name in load_project(demo_paths.project_file).baselines]
    for section in ("| student |", "| ensemble |", "| base |", *baselines,
                    "| expert:code |", "Dirichlet worst", "best single expert",
                    "## Student against the ensemble", "## Generation check",
                    "top 256 tokens of 2048 plus a tail bucket"):
        assert section in text, section
    for picture in ("excess.png", "curve.png", "dirichlet.png"):
        assert (out / picture).stat().st_size > 1000, picture
    summary = json.loads((out / "summary.json").read_text())
    rows = {row["domain"]: row for row in summary["student_vs_ensemble"]}
    assert set(rows) == set(demo_paths.expert_dirs)
    for row in rows.values():
        assert row["met"] == (row["gap"] <= 0.05) and row["student"] > 0
    nll = summary["generation"]["nll"]
    assert set(nll) == {"student", "ensemble"} and all(v > 0 for v in nll["student"].values())


def test_distill_report_without_a_student_is_a_one_line_error(demo_paths, tmp_path, capsys):
    code = main(["distill-report", "--project", str(demo_paths.project_file),
                 "--student", str(tmp_path / "none")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "not found" in err, err
