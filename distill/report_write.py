"""The distillation report's files: the gate report's table and PNG, then the student's own sections.

``report.md`` starts with ``gate.evaluate.write_report``'s table (every method's
per-domain cross-entropy and excess, worst domain, Dirichlet worst and p90)
and its ``excess.png``; this module adds ``curve.png`` (the training curve),
``dirichlet.png`` (each method's excess over 200 Dirichlet(1) mixtures of
domains, sorted) and the sections on the student, the student as a draft,
the generation check and the run's settings; ``summary.json`` holds the
figures (the draft's under ``"draft"``, to compare runs).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from gatemix.distill.acceptance import AcceptanceTally
from gatemix.distill.report import (
    GenerationCheck,
    best_single_expert,
    miss_reasons,
    student_vs_ensemble,
)
from gatemix.gate.fit.evaluate import EvaluationReport, dirichlet_mixtures, write_report

GENERATION_INTRO = ("Greedy continuations of each domain's first eval prompts, scored by the "
                    "ensemble (lower is what the ensemble finds likelier).")


DRAFT_INTRO = (
    "How the student would do as the ensemble's speculative-decoding draft (`gatemix serve "
    "--draft <student>`), with N = {n} draft tokens per step. 1 - TV is the chance that a "
    "sampled draft token is accepted at temperature 1 (sum_y min(p, q)); greedy agreement, the "
    "share of positions where both argmaxes agree; the acceptance length is vLLM's mean "
    "acceptance length (1 + accepted draft tokens per step, at most N + 1 = {top}), from "
    "L_t = 1 + sum_j prod_(i<j) a_(t+i). These are estimates: teacher-forced along the "
    "held-out eval text, not along the text the ensemble generates, with positions taken as "
    "independent (Leviathan et al.). The engine measures the real figure: `gatemix bench "
    "engine --draft <student> --num-draft-tokens {n}` (greedy: compare the greedy column).")


def draft_summary(draft: AcceptanceTally) -> dict:
    """The draft figures for ``summary.json``: per domain, and their mean over domains."""
    domains = draft.means()
    figures = next(iter(domains.values()), {})
    mean = {name: sum(d[name] for d in domains.values()) / len(domains) for name in figures}
    return {"draft_tokens": draft.draft_tokens, "domains": domains, "mean_over_domains": mean}


def _draft_lines(summary: dict) -> list[str]:
    n = summary["draft_tokens"]
    lines = [DRAFT_INTRO.format(n=n, top=n + 1), "",
             (f"| domain | 1 - TV (mean acceptance) | greedy agreement | acceptance length at "
              f"N = {n}, sampling (T = 1) | acceptance length, greedy |"), "|---|---:|---:|---:|---:|"]
    rows = {**summary["domains"], "mean over domains": summary["mean_over_domains"]}
    for domain, figures in rows.items():
        lines.append(f"| {domain} | {figures['acceptance']:.4f} | "
                     f"{figures['greedy_agreement']:.4f} | {figures['accept_length']:.3f} | "
                     f"{figures['greedy_accept_length']:.3f} |")
    return lines


def _pyplot():
    import matplotlib  # optional (the dev extra), and only for the plots

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_training_curve(record: dict, path: Path) -> bool:
    """Train loss per step, held-out KL, held-out cross-entropy; False when there is no history."""
    history, evals = record.get("history") or [], record.get("evals") or []
    if not history:
        return False
    plt = _pyplot()
    figure, (train, kl_axis, ce_axis) = plt.subplots(1, 3, figsize=(13, 3.6))
    config = record.get("config", {})
    title = config.get("loss", "")
    if config.get("label_weight") and config.get("loss") != "cross_entropy":
        title += f" + {config['label_weight']} x data cross-entropy"
    train.plot([h["step"] for h in history], [h["loss"] for h in history], lw=1)
    train.set(xlabel="step", ylabel="nats/token", title=f"train loss ({title})")
    for domain in (evals[0]["kl"] or {}) if evals else {}:
        kl_axis.plot([e["step"] for e in evals], [e["kl"][domain] for e in evals], "o-",
                     label=domain)
    kl_axis.set(xlabel="step", ylabel="nats/token", title="held-out KL(ensemble || student)")
    for domain in (evals[0]["ce"] if evals else {}):
        ce_axis.plot([e["step"] for e in evals], [e["ce"][domain] for e in evals], "o-",
                     label=domain)
    ce_axis.set(xlabel="step", ylabel="nats/token", title="held-out cross-entropy")
    for axis in (train, kl_axis, ce_axis):
        if record.get("best_step") is not None:
            axis.axvline(record["best_step"], color="grey", ls=":", label="kept step")
        if axis is not train and evals:
            axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def plot_dirichlet_curve(report: EvaluationReport, methods: list[str], path: Path) -> None:
    """Each method's excess under 200 Dirichlet(1) domain mixtures, sorted (the robustness curve)."""
    plt = _pyplot()
    mixtures = dirichlet_mixtures(len(report.domains))
    figure, axis = plt.subplots(figsize=(6, 3.8))
    for name in methods:
        curve = mixtures @ torch.tensor(report.methods[name].excess, dtype=torch.float64)
        values = curve.sort().values
        axis.plot(torch.linspace(0, 1, len(values)), values, label=name)
    axis.set(xlabel="quantile of the Dirichlet(1) mixtures", ylabel="excess (nats/token)",
             title="excess over the in-domain expert, per domain mixture")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _setup_lines(record: dict, composite: Path, seq_len: int, num_windows: int) -> list[str]:
    config, teacher = record.get("config", {}), record.get("teacher", {})
    top_k = teacher.get("top_k") or 0
    target = (f"its top {top_k} tokens of {teacher.get('vocab_size')} plus a tail bucket" if top_k
              else f"its full distribution over {teacher.get('vocab_size')} tokens (exact)")
    weights = record.get("domain_weights", {})
    shares = ", ".join(f"{d} {w:.3f}" for d, w in weights.get("weights", {}).items())
    student = record.get("student", {})
    lines = [
        (f"- ensemble: `{composite}`, gate {teacher.get('gate', {}).get('method', '?')} "
         f"{teacher.get('gate', {}).get('version', '')}"),
        f"- eval: {num_windows} windows of {seq_len} tokens from the domains' eval splits",
    ]
    if config:
        lines += [
            f"- loss {config.get('loss')}" + (f" (beta {config.get('beta')})"
                                              if config.get("loss") == "jsd" else "")
            + (f" + {config.get('label_weight')} x the data's cross-entropy"
               if config.get("label_weight") and teacher.get("used") else "")
            + (f"; the teacher gave {target}" if teacher.get("used") else "; no teacher"),
            f"- domain weights: {weights.get('kind')} ({shares})",
            (f"- {config.get('steps')} steps of {config.get('batch_size')} x "
             f"{config.get('seq_len')} tokens, on-policy share "
             f"{config.get('on_policy_fraction')}, lr {config.get('lr')}"),
            (f"- student: {student.get('architecture')} with {student.get('parameters', 0):,} "
             f"parameters, init {student.get('init')} from `{student.get('from')}`; kept: "
             f"{record.get('kept')} step {record.get('kept_step')}"),
        ]
    return lines


def _comparison_lines(report: EvaluationReport, others: list[str]) -> list[str]:
    student = report.methods["student"]
    lines = []
    for name in others:
        theirs = report.methods[name]
        gaps = [s - t for s, t in zip(student.cross_entropy, theirs.cross_entropy)]
        worse = [f"{d} (+{g:.4f})" for d, g in zip(report.domains, gaps) if g > 0]
        verdict = ("the student is better on every domain" if not worse
                   else "the student is worse on " + ", ".join(worse))
        lines.append(f"- against {name}: {verdict}; mean CE {student.mean_cross_entropy:.4f} vs "
                     f"{theirs.mean_cross_entropy:.4f}")
    return lines


def _generation_lines(check: GenerationCheck) -> list[str]:
    lines = [("| domain | ensemble NLL of the student's greedy text | of the ensemble's own | "
              "same token at the same position |"), "|---|---|---|---|"]
    for domain, agreement in check.agreement.items():
        lines.append(f"| {domain} | {check.nll['student'][domain]:.4f} | "
                     f"{check.nll['ensemble'][domain]:.4f} | {100 * agreement:.1f}% |")
    for domain, texts in check.examples.items():
        lines += ["", f"**{domain}**", ""]
        for key, text in texts.items():
            lines += [f"{key}:", "", "```", text.replace("```", "'''"), "```"]
    return lines


def write_distill_report(report: EvaluationReport, out_dir: Path, *, record: dict,
                         generation: GenerationCheck, target: float, compare: list[str],
                         composite: Path, seq_len: int, num_windows: int,
                         draft: AcceptanceTally) -> Path:
    """Write ``report.md``, its PNGs and ``summary.json`` into ``out_dir``; returns ``report.md``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    best = best_single_expert(report)
    plots = {}
    if plot_training_curve(record, out_dir / "curve.png"):
        plots["training curve"] = "curve.png"
    plot_dirichlet_curve(report, ["student", "ensemble", best, *compare], out_dir / "dirichlet.png")
    plots["Dirichlet curve"] = "dirichlet.png"
    rows = student_vs_ensemble(report, target)
    worst = max(rows, key=lambda row: row["gap"])
    student = report.methods["student"]
    report.notes = [f"best single expert: {best} (lowest mean cross-entropy)",
                    (f"worst domain for the student: {student.worst_domain} "
                     f"(excess {student.worst_excess:+.4f})")]
    path = write_report(report, out_dir, title="Distilled student: evaluation on the eval split",
                        plots=plots)
    heading = f"## Student against the ensemble (target: within {100 * target:.0f}% on every domain)"
    lines = ["", "## Setup", "", *_setup_lines(record, composite, seq_len, num_windows), "",
             heading, "", "| domain | student CE | ensemble CE | gap | target |",
             "|---|---|---|---|---|"]
    for row in rows:
        verdict = "met" if row["met"] else f"missed by {100 * (row['gap'] - target):.2f} points"
        lines.append(f"| {row['domain']} | {row['student']:.4f} | {row['ensemble']:.4f} | "
                     f"{100 * row['gap']:+.1f}% | {verdict} |")
    lines += ["", f"Worst domain: {worst['domain']} at {100 * worst['gap']:+.1f}%."]
    reasons = miss_reasons(rows, record, report)
    if reasons:
        lines += ["", "Why the target is missed, from the figures:", "",
                  *[f"- {reason}" for reason in reasons]]
    drafting = draft_summary(draft)
    lines += ["", "## Against the other models", "",
              *_comparison_lines(report, [best, *compare, "ensemble"]),
              "", "## The student as a draft", "", *_draft_lines(drafting),
              "", "## Generation check", "",
              GENERATION_INTRO, "", *_generation_lines(generation)]
    path.write_text(path.read_text() + "\n".join(lines) + "\n")
    summary = {"evaluation": report.to_dict(), "student_vs_ensemble": rows, "target": target,
               "best_single_expert": best, "generation": vars(generation), "draft": drafting,
               "teacher_top_k": record.get("teacher", {}).get("top_k")}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return path
