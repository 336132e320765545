"""A real Prometheus scrapes the session's gatemix server while real requests run.

Every PromQL expression of the Grafana dashboard must return data, and so must
every query of the dashboards built for vLLM (``tests/deploy/vllm_dashboards.py``)
but the ones listed empty with their reason; the per-expert weight series must agree with the ``mixture`` objects the responses
returned. ``GATEMIX_DASHBOARD_PNG=deploy/dashboard.png`` redraws the checked-in
picture of the panels from this test's data.
"""

from __future__ import annotations

import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "deploy"))
from conftest import API_KEY
from prometheus_harness import (
    DEFAULT_VARIABLES,
    dashboard_exprs,
    label_values,
    prometheus_binary,
    query,
    run_prometheus,
    substitute,
    targets_up,
)
from render_dashboard import DASHBOARD
from server_harness import ENSEMBLE
from vllm_dashboards import EMPTY_ON_GATEMIX, dashboard_queries

pytestmark = pytest.mark.skipif(prometheus_binary() is None, reason="needs Debian's prometheus (make prometheus)")


@pytest.fixture(scope="module")
def scraped(server, tmp_path_factory):
    """Scrape the session server, send requests; yield Prometheus' URL, what the responses said, and
    the counters' values before (the server is shared: the other tests' traffic came first)."""
    import openai

    tmp = tmp_path_factory.mktemp("prometheus-e2e")
    with run_prometheus(server.base_url.removeprefix("http://"), tmp / "prometheus") as prometheus_url:
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
        experts = [m.id for m in client.models.list().data if m.id != ENSEMBLE]
        deadline = time.time() + 60
        while not targets_up(prometheus_url):  # target discovery takes a few seconds
            assert time.time() < deadline, "Prometheus never scraped gatemix"
            time.sleep(0.5)
        before = time.time()  # a scrape before any of this test's requests (the suite runs its tests in turn)
        observed = _send_traffic(client, experts)
        # GATEMIX_DASHBOARD_OBSERVE_S=60 keeps traffic flowing for a fuller picture.
        while time.time() - before < float(os.environ.get("GATEMIX_DASHBOARD_OBSERVE_S", "0")):
            observed = _send_traffic(client, experts, observed)
        time.sleep(4)  # at least two scrapes after the last request
        yield prometheus_url, observed, experts, before


def _value(prometheus_url: str, expr: str, at: float | None = None) -> float:
    """One series' value (0 where it does not exist yet)."""
    result = query(prometheus_url, expr, at)
    return float(result[0]["value"][1]) if result else 0.0


def _send_traffic(client, experts: list[str], observed: dict | None = None) -> dict:
    """Gated, pinned and single-expert requests; per model, the sums the metrics must show."""
    observed = observed or {
        "weight_sums": defaultdict(lambda: defaultdict(float)),  # model -> expert -> sum of mean weights
        "token_sums": defaultdict(lambda: defaultdict(float)),  # model -> expert -> sum of weights over tokens
    }
    weight_sums, token_sums = observed["weight_sums"], observed["token_sums"]
    pinned = {experts[0]: 0.7, experts[1]: 0.3}
    requests = (
        [(ENSEMBLE, None)] * 4 + [(ENSEMBLE, {"mixture": {"weights": pinned}})] * 3 + [(experts[-1], None)] * 2
    )
    for i, (model, extra) in enumerate(requests):
        response = client.completions.create(
            model=model, prompt=f"def handler_{i}(request):", max_tokens=12, temperature=0.8, seed=i,
            extra_body=extra,
        )
        mixture = response.choices[0].model_extra.get("mixture") or response.model_extra["mixture"]
        tokens = response.usage.completion_tokens
        for expert, weight in mixture["mean_weights"].items():
            weight_sums[model][expert] += weight
            token_sums[model][expert] += weight * tokens
    with pytest.raises(openai_not_found()):
        client.completions.create(model="no-such-model", prompt="x", max_tokens=1)
    return observed


def openai_not_found():
    import openai

    return openai.NotFoundError


def test_every_dashboard_expression_returns_data(scraped):
    prometheus_url, *_ = scraped
    # This server has no draft: the speculative panels stay empty (tests/deploy checks them).
    exprs = [expr for expr in dashboard_exprs(DASHBOARD) if "spec_decode" not in expr]
    empty = [expr for expr in exprs if not query(prometheus_url, expr)]
    assert not empty, f"dashboard expressions with no data: {empty}"


def test_weight_series_agree_with_the_mixture_objects(scraped):
    """What this test's requests added to each series equals what their responses said."""
    prometheus_url, observed, _experts, before = scraped
    for model, by_expert in observed["weight_sums"].items():
        for expert, expected in by_expert.items():
            weights = f'gatemix_gate_weight_sum{{model="{model}",expert="{expert}"}}'
            assert query(prometheus_url, weights), (model, expert)
            added = _value(prometheus_url, weights) - _value(prometheus_url, weights, before)
            assert added == pytest.approx(expected, abs=1e-6)
            tokens = f'gatemix_gate_weighted_tokens_total{{model="{model}",expert="{expert}"}}'
            added = _value(prometheus_url, tokens) - _value(prometheus_url, tokens, before)
            assert added == pytest.approx(observed["token_sums"][model][expert], rel=1e-4, abs=1e-6)


def test_single_expert_model_puts_all_weight_on_its_expert(scraped):
    prometheus_url, _, experts, _ = scraped
    share = query(
        prometheus_url,
        f'sum by (expert) (gatemix_gate_weighted_tokens_total{{model="{experts[-1]}"}})'
        f' / ignoring(expert) group_left sum(gatemix_generation_tokens_total{{model="{experts[-1]}"}})',
    )
    by_expert = {sample["metric"]["expert"]: float(sample["value"][1]) for sample in share}
    assert by_expert[experts[-1]] == pytest.approx(1.0, abs=1e-6)
    assert all(v == pytest.approx(0.0, abs=1e-6) for e, v in by_expert.items() if e != experts[-1])


def test_errors_are_counted_by_code(scraped):
    prometheus_url, *_ = scraped
    result = query(prometheus_url, 'gatemix_request_errors_total{code="404"}')
    assert result and float(result[0]["value"][1]) >= 1


def test_dashboard_renders_from_the_scraped_data(scraped, tmp_path):
    from render_dashboard import render_dashboard

    prometheus_url, _, _, start = scraped
    out = Path(os.environ.get("GATEMIX_DASHBOARD_PNG", tmp_path / "dashboard.png"))
    titles = render_dashboard(prometheus_url, out, start - 5, time.time(), step_s=1.0)
    assert titles and out.stat().st_size > 10_000


def test_the_dashboards_built_for_vllm_find_their_series(scraped):
    """vLLM's and production-stack's dashboards over gatemix: data for every query but the listed ones."""
    prometheus_url, *_ = scraped
    # Their $model_name is picked from vLLM's series; it is the ensemble's name, as gatemix's `model` label.
    assert label_values(prometheus_url, "model_name", '{__name__=~"vllm:.*"}') == [ENSEMBLE]
    variables = {**DEFAULT_VARIABLES, "model_name": ENSEMBLE}
    without_data, listed_but_with_data = [], []
    for panel, exprs in dashboard_queries().items():
        for expr in exprs:
            has_data = bool(query(prometheus_url, substitute(expr, variables)))
            if expr in EMPTY_ON_GATEMIX and has_data:
                listed_but_with_data.append((panel, expr))
            elif expr not in EMPTY_ON_GATEMIX and not has_data:
                without_data.append((panel, expr))
    assert not without_data, without_data
    assert not listed_but_with_data, listed_but_with_data
