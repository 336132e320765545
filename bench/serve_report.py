"""What ``gatemix bench serve`` prints: per-point medians, the ratios, the table and the plot.

Pure functions of the results dict, so they are tested on fake figures.

Ratios, per concurrency and prompt length:

* efficiency ``E = K * tps(ensemble) / tps(gatemix single)``: 1 when K
  experts cost exactly K times one, i.e. mixing and gating add nothing;
* server overhead ``tps(gatemix single) / tps(vllm serve)``;
* API CPU overhead ``cpu(vllm API) / cpu(gatemix API)`` per output token, the
  same orientation (1 = parity, below 1 = gatemix's HTTP process costs more);
  it does not depend on how the cores were shared, which tokens/s does;
* speed-up over lockstep ``tps(ensemble) / tps(lockstep)``;
* student speed-up ``tps(student) / tps(ensemble)``: what distilling buys, at
  best K when the student has one expert's shape and compute dominates.

With repeated rounds (``--repeats``), a ratio is the median over rounds of the
ratio within each round (the two runs next to each other in time), and its
range over rounds is kept: on a shared machine the pairing cancels the slow
drifts that move both systems alike.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from gatemix.server.choices import DraftAcceptance

SYSTEM_LABELS = {
    "ensemble": "gatemix ensemble (K experts)",
    "uniform": "gatemix ensemble, uniform gate",
    "single": "gatemix, one expert",
    "vllm": "vllm serve, one expert",
    "student": "gatemix student",
    "draft": "gatemix ensemble behind the draft",
    "lockstep": "lockstep ensemble (K vLLM + mixer)",
}
# Figures kept for every run of a repeated point, in round order.
RUN_SERIES = ("output_tps", "api_cpu_us_per_token")


def median_point(runs: list[dict]) -> dict:
    """The run with the median output tokens/s, carrying every run's figures and the peak memory of all."""
    ordered = sorted(runs, key=lambda run: run.get("output_tps", 0.0))
    point = dict(ordered[(len(ordered) - 1) // 2])
    for key in RUN_SERIES:
        point[f"{key}_runs"] = [run.get(key) for run in runs]
    point["peak_rss_mib"] = max(run.get("peak_rss_mib", 0.0) for run in runs)
    return point


def _series(point: dict | None, key: str) -> list[float | None]:
    if point is None:
        return []
    return point.get(f"{key}_runs") or [point.get(key)]


def paired_ratios(numerator: dict | None, denominator: dict | None, key: str = "output_tps") -> list[float]:
    """``numerator / denominator`` per round; the medians' ratio when the rounds do not pair up."""
    num, den = _series(numerator, key), _series(denominator, key)
    if not num or not den:
        return []
    if len(num) != len(den):  # a failed run left one system a round short
        num, den = [numerator.get(key)], [denominator.get(key)]
    return [a / b for a, b in zip(num, den) if a and b]


def draft_acceptance(before: dict[str, float], after: dict[str, float]) -> dict:
    """A point's acceptance rate and mean acceptance length, from vLLM's totals around it."""
    during = DraftAcceptance.from_counters(after) - DraftAcceptance.from_counters(before)
    return during.figures() if during.steps > 0 else {}


def _summary(ratios: list[float], scale: float = 1.0) -> tuple[float | None, list[float] | None]:
    """(median, [min, max] when there are several rounds)."""
    if not ratios:
        return None, None
    scaled = [scale * r for r in ratios]
    return statistics.median(scaled), ([min(scaled), max(scaled)] if len(scaled) > 1 else None)


def compute_ratios(points: list[dict], num_experts: int) -> list[dict]:
    """Per (prompt_len, concurrency): E, server overheads, speed-ups over lockstep and of the student (None if missing)."""
    by_key = {(p["system"], p["prompt_len"], p["concurrency"]): p for p in points}
    ratios = []
    for prompt_len, concurrency in sorted({(p["prompt_len"], p["concurrency"]) for p in points}):
        ensemble, uniform, single, vllm, lockstep, student, draft = (
            by_key.get((s, prompt_len, concurrency))
            for s in ("ensemble", "uniform", "single", "vllm", "lockstep", "student", "draft")
        )
        row = {"prompt_len": prompt_len, "concurrency": concurrency}
        for name, values, scale in (
            ("efficiency_E", paired_ratios(ensemble, single), num_experts),
            ("server_overhead", paired_ratios(single, vllm), 1.0),
            ("api_cpu_overhead", paired_ratios(vllm, single, "api_cpu_us_per_token"), 1.0),
            ("speedup_over_lockstep", paired_ratios(ensemble, lockstep), 1.0),
            ("student_speedup", paired_ratios(student, ensemble), 1.0),
            ("draft_speedup", paired_ratios(draft, ensemble), 1.0),
            ("gate_cost", paired_ratios(ensemble, uniform), 1.0),
        ):
            row[name], row[f"{name}_range"] = _summary(values, scale)
        ratios.append(row)
    return ratios


def _cell(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _tps_cell(point: dict) -> str:
    """Output tokens/s, with the range of the runs when a point was repeated."""
    runs = [run for run in point.get("output_tps_runs") or [] if run]
    cell = _cell(point.get("output_tps"))
    return f"{cell} ({min(runs):.0f}-{max(runs):.0f})" if len(runs) > 1 else cell


def _ratio_cell(row: dict, name: str, digits: int = 3, suffix: str = "") -> str:
    value, spread = row.get(name), row.get(f"{name}_range")
    if value is None:
        return "n/a"
    cell = f"{value:.{digits}f}{suffix}"
    return f"{cell} ({spread[0]:.{digits}f}-{spread[1]:.{digits}f})" if spread else cell


def _draft_length(points: list[dict], row: dict) -> float | None:
    for point in points:
        if (point["system"], point["prompt_len"], point["concurrency"]) == (
                "draft", row["prompt_len"], row["concurrency"]):
            return point.get("mean_acceptance_length")
    return None


def format_serve_bench(result: dict) -> str:
    """The markdown table, the ratios and the notes."""
    config = result["config"]
    lines = [
        (f"gatemix bench serve: K = {result['num_experts']} experts, output {config['output_len']} tokens, "
         f"greedy, dtype {config['dtype']}, load from `vllm bench serve` (openai backend, random prompts, "
         f"seed {config['seed']}), {config['repeats']} round(s)"
         + (", systems interleaved" if config.get("interleave") else "")),
        "",
        ("| system | concurrency | prompt len | output tok/s | TTFT p50 (ms) | TTFT p99 (ms) "
         "| ITL p50 (ms) | ITL p99 (ms) | API CPU (us/token) | peak RSS (MiB) |"),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in result["points"]:
        lines.append(
            f"| {SYSTEM_LABELS.get(p['system'], p['system'])} | {p['concurrency']} | {p['prompt_len']} "
            f"| {_tps_cell(p)} | {_cell(p.get('ttft_p50_ms'))} | {_cell(p.get('ttft_p99_ms'))} "
            f"| {_cell(p.get('itl_p50_ms'), 2)} | {_cell(p.get('itl_p99_ms'), 2)} "
            f"| {_cell(p.get('api_cpu_us_per_token'), 0)} | {_cell(p.get('peak_rss_mib'), 0)} |"
        )
    lines += [
        "",
        ("| concurrency | prompt len | E = K*tps(ensemble)/tps(single) | overhead = tps(single)/tps(vllm) "
         "| API CPU overhead = cpu(vllm)/cpu(single) | speed-up = tps(ensemble)/tps(lockstep) "
         "| student = tps(student)/tps(ensemble) | draft = tps(behind the draft)/tps(ensemble) "
         "| mean acceptance length | gate = tps(ensemble)/tps(uniform gate) |"),
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["ratios"]:
        lines.append(
            f"| {r['concurrency']} | {r['prompt_len']} | {_ratio_cell(r, 'efficiency_E')} "
            f"| {_ratio_cell(r, 'server_overhead')} | {_ratio_cell(r, 'api_cpu_overhead')} "
            f"| {_ratio_cell(r, 'speedup_over_lockstep', 1, 'x')} "
            f"| {_ratio_cell(r, 'student_speedup', 2, 'x')} | {_ratio_cell(r, 'draft_speedup', 2, 'x')} "
            f"| {_cell(_draft_length(result['points'], r), 2)} | {_ratio_cell(r, 'gate_cost', 3, 'x')} |"
        )
    if config["repeats"] > 1:
        lines += ["", "Ratios: median over rounds of each round's ratio, (min-max) over rounds."]
    if result.get("notes"):
        lines += ["", *(f"- {note}" for note in result["notes"])]
    return "\n".join(lines)


def plot_serve_bench(result: dict, path: Path) -> None:
    """Output tokens/s against concurrency: one line per system, one subplot per prompt length."""
    import matplotlib  # optional (the dev extra), and only for the plot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prompt_lens = sorted({p["prompt_len"] for p in result["points"]}) or [0]
    fig, axes = plt.subplots(1, len(prompt_lens), figsize=(5.5 * len(prompt_lens), 4.2), squeeze=False)
    for ax, prompt_len in zip(axes[0], prompt_lens):
        for system in dict.fromkeys(p["system"] for p in result["points"]):
            series = sorted((p["concurrency"], p["output_tps"]) for p in result["points"]
                            if p["system"] == system and p["prompt_len"] == prompt_len and p.get("output_tps"))
            if series:
                ax.plot(*zip(*series), marker="o", label=SYSTEM_LABELS.get(system, system))
        ax.set(xscale="log", yscale="log", xlabel="concurrency", ylabel="output tokens/s",
               title=f"prompt {prompt_len} + output {result['config']['output_len']} tokens")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"gatemix bench serve, K = {result['num_experts']} experts")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
