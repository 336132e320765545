"""``gatemix distill-report``: every model on the same eval windows, the target check, a generation check."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from gatemix.cli import main
from gatemix.distill.data import eval_windows
from gatemix.distill.report import causal_lm_logprobs, ensemble_and_student_pass, window_features
from gatemix.distill.teacher import EnsembleTeacher
from gatemix.gate.fit.expert_bank import HFExpertBank
from gatemix.gate.fit.report import model_token_logprobs
from gatemix.project import load_project


def test_distill_report_compares_the_student_with_the_ensemble_baselines_and_experts(
        tiny_student, demo_paths, composite_dir, tmp_path, capsys):
    out = tmp_path / "report"
    code = main(["distill-report", "--project", str(demo_paths.project_file),
                 "--student", str(tiny_student), "--composite-dir", str(composite_dir),
                 "--compare", f"base={demo_paths.root / 'base'}", "--out-dir", str(out),
                 "--eval-tokens", "256", "--prompts-per-domain", "2", "--prompt-tokens", "8",
                 "--new-tokens", "6", "--draft-tokens", "2"])
    assert code == 0, capsys.readouterr().err[-2000:]
    text = (out / "report.md").read_text()
    baselines = [f"| {name} |" for name in load_project(demo_paths.project_file).baselines]
    for section in ("| student |", "| ensemble |", "| base |", *baselines,
                    "| expert:code |", "Dirichlet worst", "best single expert",
                    "## Student against the ensemble", "## Generation check",
                    "## The student as a draft", "acceptance length at N = 2",
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
    draft = summary["draft"]
    assert draft["draft_tokens"] == 2 and set(draft["domains"]) == set(demo_paths.expert_dirs)
    for figures in [*draft["domains"].values(), draft["mean_over_domains"]]:
        assert 0 < figures["acceptance"] < 1 and 0 <= figures["greedy_agreement"] <= 1
        for length, per_position in (("accept_length", "acceptance"),
                                     ("greedy_accept_length", "greedy_agreement")):
            # 1 + a_t <= L_t <= 1 + N a_t, averaged over all positions but the last (N = 2)
            a = figures[per_position]
            assert 1 <= figures[length] <= 3 and 1 + a - 0.05 <= figures[length] <= 1 + 2 * a + 0.05


def test_the_draft_pass_scores_the_ensemble_against_itself_as_a_perfect_draft(
        tiny_student, demo_paths, composite_dir):
    project = load_project(demo_paths.project_file)
    expert_dirs = list(project.experts.values())
    windows = eval_windows(project, AutoTokenizer.from_pretrained(expert_dirs[0]), 32, 128)
    teacher = EnsembleTeacher.load(composite_dir, expert_dirs)
    itself = ensemble_and_student_pass(teacher, lambda ids: teacher(ids)[0], windows, 4, 3)
    for figures in itself.draft.means().values():
        assert figures == pytest.approx({"acceptance": 1.0, "greedy_agreement": 1.0,
                                         "accept_length": 4.0, "greedy_accept_length": 4.0})
    # the student's token log-probs from the shared pass are the ones it gets scored alone
    student = AutoModelForCausalLM.from_pretrained(tiny_student, dtype=torch.float32)
    scored = ensemble_and_student_pass(teacher, causal_lm_logprobs(student), windows, 4, 3)
    features = window_features(windows, teacher, expert_dirs, 4)  # the teacher's expert models, not a copy
    alone = model_token_logprobs(tiny_student, features)
    domain = windows.domains[0]
    rows = windows.windows[domain][:4]
    fresh = HFExpertBank(expert_dirs).score(rows, torch.ones_like(rows), with_hidden=False)
    torch.testing.assert_close(features[domain].next_logprobs[:4], fresh.next_logprobs)
    for domain in windows.domains:
        torch.testing.assert_close(scored.student[domain], alone[domain], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(scored.ensemble[domain], itself.ensemble[domain])


def test_distill_report_without_a_student_is_a_one_line_error(demo_paths, tmp_path, capsys):
    code = main(["distill-report", "--project", str(demo_paths.project_file),
                 "--student", str(tmp_path / "none")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "not found" in err, err
