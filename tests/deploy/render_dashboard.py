"""Draw the Grafana dashboard's panels from what a Prometheus server returns.

One subplot per panel (a repeated panel once per value of its variable), titled
like the panel, so a test's data can be looked at without Grafana:

    python tests/deploy/render_dashboard.py --prometheus http://127.0.0.1:9090 \
        --minutes 10 --out deploy/dashboard.png
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prometheus_harness import (
    dashboard_panels,
    label_values,
    panel_exprs,
    query,
    query_range,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "dashboards" / "gatemix.json"

# Grafana's $__rate_interval for a range query is about four scrapes or the step.
def _range_variables(step_s: float) -> dict[str, str]:
    return {"__rate_interval": f"{max(4, int(4 * step_s))}s", "__interval": f"{int(step_s)}s"}


def _legend(fmt: str, labels: dict[str, str]) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt) or \
        ",".join(f"{k}={v}" for k, v in labels.items())


def _float(value: str) -> float:
    number = float(value)
    return number if math.isfinite(number) else math.nan


def _expanded_panels(base_url: str, path: Path) -> list[tuple[dict, dict[str, str]]]:
    """(panel, extra variables) pairs; a repeated panel once per label value."""
    out = []
    for panel in dashboard_panels(path):
        if panel.get("type") == "row":
            continue
        variable = panel.get("repeat")
        if not variable:
            out.append((panel, {}))
            continue
        for value in label_values(base_url, variable, match="{__name__=~\"gatemix_.*\"}"):
            title = panel["title"].replace(f"${variable}", value)
            out.append(({**panel, "title": title}, {variable: re.escape(value)}))
    return out


def _draw_timeseries(ax, base_url, panel, variables, start, end, step_s):
    exprs = panel_exprs(panel, {**_range_variables(step_s), **variables})
    stacked = panel.get("fieldConfig", {}).get("defaults", {}).get("custom", {}) \
        .get("stacking", {}).get("mode") == "normal"
    curves = []
    for target, expr in zip(panel["targets"], exprs):
        for series in query_range(base_url, expr, start, end, step_s):
            times = [float(t) - end for t, _ in series["values"]]
            values = [_float(v) for _, v in series["values"]]
            curves.append((_legend(target.get("legendFormat", ""), series["metric"]),
                           times, values))
    if stacked and curves:
        # Align on the union of timestamps; a missing point counts as 0 in the stack.
        grid = sorted({t for _, times, _ in curves for t in times})
        stacks = []
        for _, times, values in curves:
            lookup = dict(zip(times, values))
            stacks.append([0.0 if math.isnan(lookup.get(t, math.nan)) else lookup[t]
                           for t in grid])
        ax.stackplot(grid, stacks, labels=[label for label, _, _ in curves], alpha=0.8)
    else:
        for label, times, values in curves:
            ax.plot(times, values, label=label, linewidth=1.2)
    ax.set_xlabel("seconds before end")
    unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "")
    if unit and unit != "short":
        ax.set_ylabel(unit)
    if curves:
        ax.legend(fontsize=7, loc="upper left")


def _draw_heatmap(ax, base_url, panel, variables, start, end, step_s):
    (expr,) = panel_exprs(panel, {**_range_variables(step_s), **variables})
    series = query_range(base_url, expr, start, end, step_s)
    by_le = sorted(series, key=lambda s: float(s["metric"]["le"]))
    if not by_le:
        return
    times = [float(t) - end for t, _ in by_le[0]["values"]]
    cumulative = [[_float(v) for _, v in s["values"]] for s in by_le]
    # Buckets are cumulative in le; a row is the count between two bounds.
    rows = [cumulative[0]] + [[hi - lo for hi, lo in zip(cumulative[i], cumulative[i - 1])]
                              for i in range(1, len(cumulative))]
    bounds = [s["metric"]["le"] for s in by_le]
    ax.imshow(rows, aspect="auto", origin="lower", cmap="Oranges", interpolation="nearest",
              extent=(times[0], times[-1], 0, len(rows)))
    ax.set_yticks([i + 0.5 for i in range(0, len(rows), 4)])
    ax.set_yticklabels([f"<= {bounds[i]}" for i in range(0, len(rows), 4)], fontsize=7)
    ax.set_xlabel("seconds before end")


def _draw_stat(ax, base_url, panel, variables, end):
    lines = []
    for target, expr in zip(panel["targets"], panel_exprs(panel, variables)):
        for series in query(base_url, expr, at=end):
            value = _float(series["value"][1])
            unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "")
            if unit == "dateTimeAsIso":
                shown = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(value / 1000)) + " UTC"
            elif unit == "percentunit":
                shown = f"{100 * value:.2f}%"
            else:
                shown = f"{value:g}"
            label = _legend(target.get("legendFormat", ""), series["metric"])
            text_mode = panel.get("options", {}).get("textMode")
            lines.append(label if text_mode == "name" else f"{label}: {shown}")
    ax.text(0.5, 0.5, "\n".join(lines) or "no data", ha="center", va="center", fontsize=12,
            transform=ax.transAxes)
    ax.set_axis_off()


def _draw_bargauge(ax, base_url, panel, variables, end):
    labels, values = [], []
    for target, expr in zip(panel["targets"], panel_exprs(panel, variables)):
        for series in sorted(query(base_url, expr, at=end), key=lambda s: str(s["metric"])):
            labels.append(_legend(target.get("legendFormat", ""), series["metric"]))
            values.append(_float(series["value"][1]))
    ax.barh(labels, values, color="tab:orange")
    ax.set_xlim(0, 1)
    ax.tick_params(axis="y", labelsize=7)
    ax.invert_yaxis()


def render_dashboard(base_url: str, out_png: str | Path, start: float, end: float,
                     step_s: float = 1.0, dashboard: str | Path = DASHBOARD) -> list[str]:
    """Draw every panel over [start, end] (Unix seconds); return the subplot titles.
    Instant panels (stat, bar gauge) show their value at ``end`` over ``$__range``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = _expanded_panels(base_url, Path(dashboard))
    range_s = max(int(end - start), 1)
    columns = 3
    rows = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(6 * columns, 3.6 * rows),
                                squeeze=False)
    titles = []
    for ax, (panel, variables) in zip(axes.flat, panels):
        variables = {"__range": f"{range_s}s", **variables}
        kind = panel["type"]
        if kind == "heatmap":
            _draw_heatmap(ax, base_url, panel, variables, start, end, step_s)
        elif kind == "stat":
            _draw_stat(ax, base_url, panel, variables, end)
        elif kind == "bargauge":
            _draw_bargauge(ax, base_url, panel, variables, end)
        else:
            _draw_timeseries(ax, base_url, panel, variables, start, end, step_s)
        ax.set_title(panel["title"], fontsize=10)
        titles.append(panel["title"])
    for ax in list(axes.flat)[len(panels):]:
        ax.set_axis_off()
    figure.suptitle(f"gatemix dashboard, drawn from Prometheus at {base_url} "
                    f"({range_s}s ending {time.strftime('%H:%M:%S', time.localtime(end))})")
    figure.tight_layout(rect=(0, 0, 1, 0.97))
    figure.savefig(out_png, dpi=90)
    plt.close(figure)
    return titles


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prometheus", required=True, help="Prometheus base URL")
    parser.add_argument("--minutes", type=float, default=10.0, help="time range to draw")
    parser.add_argument("--step", type=float, default=2.0, help="range-query step, seconds")
    parser.add_argument("--out", default=str(REPO_ROOT / "deploy" / "dashboard.png"))
    args = parser.parse_args(argv)
    end = time.time()
    render_dashboard(args.prometheus, args.out, end - 60 * args.minutes, end, args.step)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
