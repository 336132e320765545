"""Every method on the same eval split: per-domain loss, worst domain, and a robustness curve.

A method is its per-token log-probs on each domain's eval sequences. From them:

- cross-entropy per domain, in nats per token;
- excess loss per domain: minus the in-domain expert's cross-entropy (the KL proxy);
- the worst domain;
- a robustness curve over 200 Dirichlet(1) mixtures lambda: the loss of the
  mixture ``sum_d lambda_d excess_d``, reported as its worst value and 90th percentile.

Other text sets (documents that switch domain, text from none of the domains)
are scored by ``score_text_set``: one cross-entropy per method over the whole
set, and an excess where the set has a reference (a switching document's
per-segment oracle: every token scored by its own segment's expert).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from gatemix.gate.registry import TokenGate, gated_token_logprobs
from gatemix.gate.token_features import TokenFeatures


@dataclass
class MethodScore:
    cross_entropy: list[float]  # per domain, nats/token
    excess: list[float]  # per domain, minus the in-domain expert's cross-entropy
    worst_domain: str
    worst_excess: float
    mean_cross_entropy: float  # token-weighted over the pooled eval split
    dirichlet_worst: float
    dirichlet_p90: float


@dataclass
class TextSetScore:
    cross_entropy: float  # nats/token over the whole set
    excess: float | None = None  # minus the set's reference, where it has one


@dataclass
class EvaluationReport:
    domains: list[str]
    methods: dict[str, MethodScore] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # set name ("switching", "out_of_domain") -> method -> its score on that set
    text_sets: dict[str, dict[str, TextSetScore]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "domains": self.domains,
            "notes": self.notes,
            "methods": {name: vars(score) for name, score in self.methods.items()},
            "text_sets": {
                name: {method: vars(score) for method, score in scores.items()}
                for name, scores in self.text_sets.items()
            },
        }


def dirichlet_mixtures(num_domains: int, count: int = 200, seed: int = 0) -> torch.Tensor:
    """``(count, D)`` mixtures drawn from Dirichlet(1), seeded."""
    generator = torch.Generator().manual_seed(seed)
    draws = -torch.log(torch.rand(count, num_domains, generator=generator, dtype=torch.float64))
    return draws / draws.sum(1, keepdim=True)


def score_method(
    token_logprobs: dict[str, torch.Tensor],
    token_masks: dict[str, torch.Tensor],
    reference_cross_entropy: list[float],
    domains: list[str],
    mixtures: torch.Tensor,
) -> MethodScore:
    """One method's figures from its ``(N, T-1)`` token log-probs on each domain."""
    totals = [float(-(token_logprobs[d] * token_masks[d]).sum()) for d in domains]
    counts = [float(token_masks[d].sum()) for d in domains]
    cross_entropy = [total / count for total, count in zip(totals, counts)]
    excess = [ce - ref for ce, ref in zip(cross_entropy, reference_cross_entropy)]
    curve = mixtures @ torch.tensor(excess, dtype=torch.float64)  # (M,)
    worst = max(range(len(domains)), key=lambda d: excess[d])
    return MethodScore(
        cross_entropy=cross_entropy,
        excess=excess,
        worst_domain=domains[worst],
        worst_excess=excess[worst],
        mean_cross_entropy=sum(totals) / sum(counts),
        dirichlet_worst=float(curve.max()),
        dirichlet_p90=float(torch.quantile(curve, 0.9)),
    )


def evaluate_methods(
    eval_features: dict[str, TokenFeatures],
    gates: dict[str, TokenGate],
    extra_token_logprobs: dict[str, dict[str, torch.Tensor]] | None = None,
    *,
    num_mixtures: int = 200,
    seed: int = 0,
) -> EvaluationReport:
    """Score experts alone, every gate and any extra model (the monolithic one) on the eval split.

    ``eval_features`` maps domain -> features, in expert order (expert j is
    domain j's reference). ``extra_token_logprobs`` maps method -> domain ->
    ``(N, T-1)`` log-probs aligned with the features' token masks.
    """
    domains = list(eval_features)
    masks = {d: eval_features[d].token_mask for d in domains}
    methods: dict[str, dict[str, torch.Tensor]] = {}
    for index, name in enumerate(domains):
        methods[f"expert:{name}"] = {d: eval_features[d].next_logprobs[..., index] for d in domains}
    for name, gate in gates.items():
        methods[name] = {d: gated_token_logprobs(gate, eval_features[d]) for d in domains}
    methods.update(extra_token_logprobs or {})

    def cross_entropy(logprobs: torch.Tensor, mask: torch.Tensor) -> float:
        return float(-(logprobs * mask).sum() / mask.sum())

    reference = [cross_entropy(methods[f"expert:{d}"][d], masks[d]) for d in domains]
    mixtures = dirichlet_mixtures(len(domains), num_mixtures, seed)
    report = EvaluationReport(domains=domains)
    for name, logprobs in methods.items():
        report.methods[name] = score_method(logprobs, masks, reference, domains, mixtures)
    return report


def score_text_set(
    features: TokenFeatures,
    gates: dict[str, TokenGate],
    extra_token_logprobs: dict[str, torch.Tensor] | None = None,
    reference_logprobs: torch.Tensor | None = None,
    expert_names: list[str] | None = None,
) -> dict[str, TextSetScore]:
    """Every expert, gate and extra model on one set of sequences; ``(N, T-1)`` log-probs in.

    ``reference_logprobs`` (aligned with the features) gives each method's
    excess over it; the experts are named ``expert:<name>``.
    """
    mask = features.token_mask
    count = float(mask.sum())

    def cross_entropy(logprobs: torch.Tensor) -> float:
        return float(-(logprobs * mask).sum()) / count

    methods = {
        f"expert:{name}": features.next_logprobs[..., index]
        for index, name in enumerate(expert_names or [])
    }
    methods.update({name: gated_token_logprobs(gate, features) for name, gate in gates.items()})
    methods.update(extra_token_logprobs or {})
    reference = None if reference_logprobs is None else cross_entropy(reference_logprobs)
    return {
        name: TextSetScore(
            cross_entropy(logprobs),
            None if reference is None else cross_entropy(logprobs) - reference,
        )
        for name, logprobs in methods.items()
    }


def why_baseline_wins(report: EvaluationReport, method: str, baseline: str, attribute: str) -> str:
    """The reason a baseline wins, where the figures show one; empty otherwise."""
    theirs, ours = report.methods[baseline], report.methods[method]
    margins = {d: -e for d, e in zip(report.domains, theirs.excess) if e < 0}
    if margins:
        return (
            f" (why: {baseline} beats the in-domain expert itself on {', '.join(margins)}, by "
            f"{min(margins.values()):.2f} to {max(margins.values()):.2f} nats/token; a mixture of "
            "experts gains little over its best expert, so the experts, not the gate, are the limit)"
        )
    gap = getattr(ours, attribute) - getattr(theirs, attribute)
    if gap < 0.01:
        return f" (a small gap: {gap:.4f} nats/token)"
    return ""


def compare_to_baselines(
    report: EvaluationReport,
    method: str,
    baselines: tuple[str, ...] = ("uniform", "erm", "monolithic"),
) -> list[str]:
    """Plain-language notes on where a baseline beats ``method`` (the issue's acceptance checks)."""
    ours, notes = report.methods[method], []
    for name in baselines:
        if name not in report.methods:
            continue
        theirs = report.methods[name]
        for label, attribute in (
            ("worst-domain excess", "worst_excess"),
            ("worst Dirichlet-mixture excess", "dirichlet_worst"),
        ):
            if getattr(theirs, attribute) < getattr(ours, attribute):
                notes.append(
                    f"{name} beats {method} on {label}: "
                    f"{getattr(theirs, attribute):.4f} < {getattr(ours, attribute):.4f}"
                    + why_baseline_wins(report, method, name, attribute)
                )
    if "erm" in report.methods:
        gap = ours.mean_cross_entropy / report.methods["erm"].mean_cross_entropy - 1
        notes.append(f"{method}'s average cross-entropy is {100 * gap:+.2f}% relative to ERM's")
    return notes


TEXT_SET_TITLES = {
    "switching": "switching documents (CE; excess over the per-segment oracle)",
    "out_of_domain": "out-of-domain text (CE)",
}


def text_set_table(report: EvaluationReport, labels: dict[str, str] | None = None) -> list[str]:
    """Markdown rows: every method's score on each text set, one column per set."""
    if not report.text_sets:
        return []
    labels = labels or {}
    sets = list(report.text_sets)
    names = list(dict.fromkeys(name for scores in report.text_sets.values() for name in scores))
    header = "| method | " + " | ".join(TEXT_SET_TITLES.get(s, s) for s in sets) + " |"
    lines = [header, "|" + "---|" * (len(sets) + 1)]
    for name in names:
        cells = []
        for set_name in sets:
            score = report.text_sets[set_name].get(name)
            if score is None:
                cells.append("")
            elif score.excess is None:
                cells.append(f"{score.cross_entropy:.4f}")
            else:
                cells.append(f"{score.cross_entropy:.4f} ({score.excess:+.4f})")
        lines.append(f"| {labels.get(name, name)} | " + " | ".join(cells) + " |")
    return lines


def plot_excess(report: EvaluationReport, path: Path) -> None:
    """A bar chart of every method's per-domain excess over the in-domain expert, as a PNG."""
    # matplotlib is deferred: it is slow to import and only the report draws.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report.methods)
    figure, axis = plt.subplots(figsize=(max(6, 1.1 * len(names)), 3.8))
    width = 0.8 / len(report.domains)
    for index, domain in enumerate(report.domains):
        values = [report.methods[name].excess[index] for name in names]
        axis.bar([i + index * width for i in range(len(names))], values, width, label=domain)
    axis.set_xticks(
        [i + 0.4 - width / 2 for i in range(len(names))], names, rotation=30, ha="right"
    )
    axis.set(ylabel="excess loss (nats/token)", title="per-domain excess over the in-domain expert")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def domain_table(report: EvaluationReport, labels: dict[str, str]) -> list[str]:
    """Markdown rows: every method's CE and excess per domain, worst domain, mean CE, Dirichlet."""
    header = (
        "| method | "
        + " | ".join(f"CE {d}" for d in report.domains)
        + " | "
        + " | ".join(f"excess {d}" for d in report.domains)
        + " | worst domain | mean CE | Dirichlet worst | Dirichlet p90 |"
    )
    lines = [header, "|" + "---|" * (2 * len(report.domains) + 5)]
    for name, score in report.methods.items():
        cells = [f"{v:.4f}" for v in score.cross_entropy] + [f"{v:+.4f}" for v in score.excess]
        lines.append(
            f"| {labels.get(name, name)} | " + " | ".join(cells) + f" | {score.worst_domain} "
            f"({score.worst_excess:+.4f}) | {score.mean_cross_entropy:.4f} | "
            f"{score.dirichlet_worst:+.4f} | {score.dirichlet_p90:+.4f} |"
        )
    return lines


def write_report(
    report: EvaluationReport,
    out_dir: str | Path,
    title: str = "Gate evaluation",
    plots: dict[str, str] | None = None,
    sections: list[str] | None = None,
    labels: dict[str, str] | None = None,
) -> Path:
    """Markdown tables of every method (each eval set), a PNG of the per-domain excess, ``sections``.

    ``labels`` renames methods in the tables (a baseline's kind); ``sections``
    are markdown lines put after the tables (targets, convergence).
    """
    labels = labels or {}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_excess(report, out_dir / "excess.png")
    lines = [f"# {title}", "", "## Single-domain documents (the eval split)", "",
             *domain_table(report, labels), "", "![per-domain excess](excess.png)", ""]
    if report.text_sets:
        lines += ["## Other kinds of text", "", *text_set_table(report, labels), ""]
    lines += list(sections or [])
    for caption, file in (plots or {}).items():
        lines += [f"![{caption}]({file})", ""]
    if report.notes:
        lines += ["## Notes", "", *[f"- {note}" for note in report.notes], ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
