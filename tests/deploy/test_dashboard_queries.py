"""Every PromQL expression of the Grafana dashboard returns data from a real Prometheus.

A real Prometheus (Debian's package, ``make prometheus``) scrapes a small HTTP server
that serves ``GateMetrics.render()`` while requests are observed at a steady pace:
each tick finishes the choices below. Then every dashboard expression is evaluated
through the HTTP API, the per-expert series are checked against the known weights,
and the panels are drawn to a PNG. The end-to-end test against a live gatemix
server reuses the same harness.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from prometheus_harness import (
    dashboard_exprs,
    dashboard_panels,
    panel_exprs,
    prometheus_binary,
    query,
    run_prometheus,
    targets_up,
)
from render_dashboard import render_dashboard

from gatemix.server.choices import DraftAcceptance
from gatemix.server.metrics import GateMetrics

pytestmark = pytest.mark.skipif(prometheus_binary() is None,
                                reason="no prometheus binary (run `make prometheus`)")

REPO_ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "dashboards" / "gatemix.json"
EXPERTS = ["code", "legal", "medical"]
ENSEMBLE = "gatemix-demo"
# Per tick: (model, mean weights, generated tokens). The expert model is a pinned
# one-hot mixture; the ensemble's choices vary.
TICK = [
    (ENSEMBLE, {"code": 0.7, "legal": 0.2, "medical": 0.1}, 8),
    (ENSEMBLE, {"code": 0.1, "legal": 0.6, "medical": 0.3}, 4),
    (ENSEMBLE, {"code": 0.2, "legal": 0.2, "medical": 0.6}, 4),
    ("code", {"code": 1.0, "legal": 0.0, "medical": 0.0}, 6),
]
# Served behind a draft: per tick, (steps, proposed, accepted) by the choice's dominant expert.
ACCEPTANCE = {
    (ENSEMBLE, "code"): DraftAcceptance(2, 6, 4),
    (ENSEMBLE, "legal"): DraftAcceptance(2, 6, 1),
    (ENSEMBLE, "medical"): DraftAcceptance(1, 3, 3),
    ("code", "code"): DraftAcceptance(2, 6, 6),
}
TICK_S = 0.25
# Longer runs make a nicer picture: GATEMIX_DASHBOARD_OBSERVE_S=60.
OBSERVE_S = float(os.environ.get("GATEMIX_DASHBOARD_OBSERVE_S", "8"))


@contextlib.contextmanager
def serve_metrics(metrics: GateMetrics, lock: threading.Lock) -> Iterator[str]:
    """GET /metrics serving GateMetrics.render() on a free loopback port; yields host:port."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            with lock:
                body, content_type = metrics.render()
            self.send_response(200 if self.path == "/metrics" else 404)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def observe_tick(metrics: GateMetrics, tick: int) -> None:
    for model, weights, tokens in TICK:
        metrics.observe_request(
            model=model, mean_weights=weights,
            token_weight_sums={e: w * tokens for e, w in weights.items()},
            prompt_tokens=12, generation_tokens=tokens, ttft_s=0.02 + 0.01 * (tick % 5),
            itl_s=[0.005 + 0.001 * (i % 7) for i in range(tokens - 1)],
            e2e_s=0.05 + 0.01 * tokens,
            draft_acceptance=ACCEPTANCE[model, max(weights, key=weights.get)])
    if tick % 4 == 0:
        metrics.observe_error(400)
    metrics.set_queue(running=tick % 3, waiting=tick % 2)


@pytest.fixture(scope="module")
def scraped(tmp_path_factory):
    """(Prometheus base URL, start, end): a Prometheus that scraped OBSERVE_S of traffic."""
    metrics = GateMetrics(EXPERTS, gate_version="learned-test", gate_loaded_at=time.time())
    lock = threading.Lock()
    with serve_metrics(metrics, lock) as target, \
            run_prometheus(target, tmp_path_factory.mktemp("prometheus")) as base_url:
        start = time.time()
        tick = 0
        while time.time() - start < OBSERVE_S:
            with lock:  # a scrape sees whole ticks, so ratios are exact
                observe_tick(metrics, tick)
            tick += 1
            time.sleep(TICK_S)
        time.sleep(2.5)  # two more scrapes of the final values
        assert targets_up(base_url)
        yield base_url, start, time.time()


def finite_values(result: list) -> list[float]:
    return [float(s["value"][1]) for s in result if math.isfinite(float(s["value"][1]))]


def test_every_dashboard_expression_returns_data(scraped):
    base_url, _, _ = scraped
    exprs = dashboard_exprs(DASHBOARD)
    assert len(exprs) >= 12
    empty = [expr for expr in exprs if not finite_values(query(base_url, expr))]
    assert not empty, "expressions without a finite value:\n" + "\n".join(empty)


def test_variable_queries_list_models_and_experts(scraped):
    base_url, _, _ = scraped
    models = {s["metric"]["model"] for s in query(base_url, "gatemix_requests_total")}
    assert models == {ENSEMBLE, "code"}
    experts = {s["metric"]["expert"] for s in query(base_url, "gatemix_gate_weight_count")}
    assert experts == set(EXPERTS)


def panel_by_title(prefix: str) -> dict:
    (panel,) = [p for p in dashboard_panels(DASHBOARD) if p["title"].startswith(prefix)]
    return panel


def series_by(result: list, label: str) -> dict[str, float]:
    return {s["metric"][label]: float(s["value"][1]) for s in result}


@pytest.mark.parametrize("model", [ENSEMBLE, "code"])
def test_mixture_series_agree_with_observed_weights(scraped, model):
    base_url, _, _ = scraped
    ticks = [(w, n) for m, w, n in TICK if m == model]
    variables = {"model": model}

    (share_expr,) = panel_exprs(panel_by_title("Mixture weights per expert"), variables)
    shares = series_by(query(base_url, share_expr), "expert")
    generated = sum(n for _, n in ticks)
    for expert in EXPERTS:
        expected = sum(w[expert] * n for w, n in ticks) / generated
        assert shares[expert] == pytest.approx(expected, abs=1e-6)
    assert sum(shares.values()) == pytest.approx(1.0)

    (mean_expr,) = panel_exprs(panel_by_title("Mean gate weight per request"), variables)
    means = series_by(query(base_url, mean_expr), "expert")
    for expert in EXPERTS:
        expected = sum(w[expert] for w, _ in ticks) / len(ticks)
        assert means[expert] == pytest.approx(expected, abs=1e-6)


def test_dominant_share_by_model(scraped):
    base_url, _, _ = scraped
    (expr,) = panel_exprs(panel_by_title("Dominant-expert share"))
    shares = {(s["metric"]["model"], s["metric"]["expert"]): float(s["value"][1])
              for s in query(base_url, expr)}
    # Ensemble: one tick's three choices are dominated by code, legal, medical.
    for expert in EXPERTS:
        assert shares[ENSEMBLE, expert] == pytest.approx(1 / 3, abs=1e-6)
    assert shares["code", "code"] == pytest.approx(1.0)
    assert shares["code", "legal"] == 0


def test_draft_acceptance_by_dominant_expert(scraped):
    base_url, _, _ = scraped
    variables = {"model": ENSEMBLE}
    (rate_expr,) = panel_exprs(panel_by_title("Draft acceptance rate"), variables)
    (length_expr,) = panel_exprs(panel_by_title("Mean acceptance length"), variables)
    rates = series_by(query(base_url, rate_expr), "expert")
    lengths = series_by(query(base_url, length_expr), "expert")
    for expert in EXPERTS:
        acceptance = ACCEPTANCE[ENSEMBLE, expert]
        assert rates[expert] == pytest.approx(acceptance.accepted_tokens / acceptance.draft_tokens, abs=1e-6)
        assert lengths[expert] == pytest.approx(1 + acceptance.accepted_tokens / acceptance.steps, abs=1e-6)


def test_gate_version_panel(scraped):
    base_url, _, _ = scraped
    (expr,) = panel_exprs(panel_by_title("Gate version"))
    assert [s["metric"]["version"] for s in query(base_url, expr)] == ["learned-test"]


def test_panels_render_to_png(scraped, tmp_path):
    base_url, start, end = scraped
    # GATEMIX_DASHBOARD_PNG=deploy/dashboard.png refreshes the checked-in picture.
    out = Path(os.environ.get("GATEMIX_DASHBOARD_PNG", tmp_path / "dashboard.png"))
    titles = render_dashboard(base_url, out, start - 2, end, step_s=1.0, dashboard=DASHBOARD)
    assert out.stat().st_size > 10_000
    panel_count = sum(1 for p in dashboard_panels(DASHBOARD) if not p.get("repeat"))
    assert len(titles) == panel_count + len(EXPERTS)  # the heatmap repeats per expert
