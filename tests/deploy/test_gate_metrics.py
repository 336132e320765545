"""GateMetrics: what a scrape of /metrics shows after a few finished choices."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families

from gatemix.server.choices import DraftAcceptance
from gatemix.server.metrics import GateMetrics

EXPERTS = ["code", "legal", "medical"]
MODEL = "gatemix-demo"

# (mean weights, generated tokens); the token sums are mean * tokens.
CHOICES = [
    ({"code": 0.7, "legal": 0.2, "medical": 0.1}, 10),
    ({"code": 0.1, "legal": 0.6, "medical": 0.3}, 4),
    ({"code": 0.5, "legal": 0.25, "medical": 0.25}, 6),
]


def observe_choices(metrics: GateMetrics, model: str = MODEL) -> None:
    for mean_weights, tokens in CHOICES:
        metrics.observe_request(
            model=model, mean_weights=mean_weights,
            token_weight_sums={e: w * tokens for e, w in mean_weights.items()},
            prompt_tokens=5, generation_tokens=tokens, ttft_s=0.03,
            itl_s=[0.01] * (tokens - 1), e2e_s=0.03 + 0.01 * (tokens - 1))


def samples(body: bytes) -> dict[tuple[str, frozenset], float]:
    """(sample name, labels) -> value, from an exposition body."""
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            out[sample.name, frozenset(sample.labels.items())] = sample.value
    return out


def value(scraped, name: str, **labels) -> float:
    return scraped[name, frozenset(labels.items())]


@pytest.fixture
def metrics() -> GateMetrics:
    return GateMetrics(EXPERTS, gate_version="learned-abc123", gate_loaded_at=1700000000.0)


def test_weight_histogram_sums_the_observed_means(metrics):
    observe_choices(metrics)
    scraped = samples(metrics.render()[0])
    for expert in EXPERTS:
        expected = sum(weights[expert] for weights, _ in CHOICES)
        got = value(scraped, "gatemix_gate_weight_sum", expert=expert, model=MODEL)
        assert got == pytest.approx(expected)
        assert value(scraped, "gatemix_gate_weight_count", expert=expert, model=MODEL) == 3
    # 0.7 for code lands in the le=0.7 bucket, 0.5 in le=0.5, 0.1 in le=0.1.
    assert value(scraped, "gatemix_gate_weight_bucket", expert="code", model=MODEL,
                 le="0.45") == 1
    assert value(scraped, "gatemix_gate_weight_bucket", expert="code", model=MODEL,
                 le="0.5") == 2
    assert value(scraped, "gatemix_gate_weight_bucket", expert="code", model=MODEL,
                 le="+Inf") == 3


def test_weighted_tokens_divide_to_the_token_level_mixture(metrics):
    observe_choices(metrics)
    scraped = samples(metrics.render()[0])
    generated = value(scraped, "gatemix_generation_tokens_total", model=MODEL)
    assert generated == sum(tokens for _, tokens in CHOICES)
    shares = {e: value(scraped, "gatemix_gate_weighted_tokens_total", expert=e, model=MODEL)
              / generated for e in EXPERTS}
    assert sum(shares.values()) == pytest.approx(1.0)
    assert shares["code"] == pytest.approx((0.7 * 10 + 0.1 * 4 + 0.5 * 6) / 20)


def test_dominant_expert_is_counted_once_per_choice(metrics):
    observe_choices(metrics)
    scraped = samples(metrics.render()[0])
    dominant = {e: value(scraped, "gatemix_dominant_expert_requests_total", expert=e, model=MODEL)
                for e in EXPERTS}
    assert dominant == {"code": 2, "legal": 1, "medical": 0}


def test_latency_and_token_counters(metrics):
    observe_choices(metrics)
    scraped = samples(metrics.render()[0])
    assert value(scraped, "gatemix_requests_total", model=MODEL) == 3
    assert value(scraped, "gatemix_prompt_tokens_total", model=MODEL) == 15
    assert value(scraped, "gatemix_time_to_first_token_seconds_count", model=MODEL) == 3
    assert value(scraped, "gatemix_inter_token_latency_seconds_count", model=MODEL) == 17
    assert value(scraped, "gatemix_inter_token_latency_seconds_sum", model=MODEL) == \
        pytest.approx(0.17)
    assert value(scraped, "gatemix_e2e_request_latency_seconds_count", model=MODEL) == 3


def test_choice_without_tokens_records_no_weights(metrics):
    metrics.observe_request(model=MODEL, mean_weights={}, token_weight_sums={},
                            prompt_tokens=7, generation_tokens=0, ttft_s=None, itl_s=[],
                            e2e_s=0.01)
    scraped = samples(metrics.render()[0])
    assert value(scraped, "gatemix_prompt_tokens_total", model=MODEL) == 7
    assert not any(name.startswith("gatemix_gate_weight_") for name, _ in scraped)
    assert value(scraped, "gatemix_time_to_first_token_seconds_count", model=MODEL) == 0


def test_restricted_mixture_counts_left_out_experts_as_zero(metrics):
    metrics.observe_request(model=MODEL, mean_weights={"code": 0.4, "legal": 0.6},
                            token_weight_sums={"code": 0.8, "legal": 1.2}, prompt_tokens=3,
                            generation_tokens=2, ttft_s=0.01, itl_s=[0.01], e2e_s=0.02)
    scraped = samples(metrics.render()[0])
    assert value(scraped, "gatemix_gate_weight_count", expert="medical", model=MODEL) == 1
    assert value(scraped, "gatemix_gate_weight_sum", expert="medical", model=MODEL) == 0
    assert value(scraped, "gatemix_gate_weighted_tokens_total", expert="medical",
                 model=MODEL) == 0


def test_draft_acceptance_counts_under_the_dominant_expert(metrics):
    """vLLM's per-request spec-decode histogram -> steps, proposed and accepted tokens per dominant expert."""
    from vllm.v1.metrics.stats import RequestSpecDecodeMetrics

    def completion(histogram, draft_tokens):
        metrics = RequestSpecDecodeMetrics.new(3)
        for accepted, count in enumerate(histogram):
            for _ in range(count):
                metrics.observe(num_draft_tokens=3, num_accepted=accepted)
        assert metrics.num_draft_tokens == draft_tokens
        return SimpleNamespace(spec_decode_metrics=metrics)

    # accepted 0, 1, 2, 3 draft tokens in 1, 0, 2, 1 steps: 4 steps, 12 proposed, 7 accepted
    first = DraftAcceptance.of(completion([1, 0, 2, 1], 12))
    assert first == DraftAcceptance(steps=4, draft_tokens=12, accepted_tokens=7)
    assert DraftAcceptance.of(SimpleNamespace(spec_decode_metrics=None)) is None
    for mean_weights, acceptance in [({"code": 0.2, "legal": 0.8}, first),
                                     ({"code": 0.9, "legal": 0.1}, DraftAcceptance(2, 6, 1)),
                                     ({"code": 0.3, "legal": 0.7}, DraftAcceptance(1, 3, 3)),
                                     ({}, DraftAcceptance(5, 15, 0))]:
        metrics.observe_request(model=MODEL, mean_weights=mean_weights, token_weight_sums={},
                                prompt_tokens=3, generation_tokens=8, ttft_s=0.01, itl_s=[],
                                e2e_s=0.02, draft_acceptance=acceptance)
    scraped = samples(metrics.render()[0])
    for expert, (steps, drafted, accepted) in {"legal": (5, 15, 10), "code": (2, 6, 1),
                                               "none": (5, 15, 0)}.items():
        assert value(scraped, "gatemix_spec_decode_steps_total", expert=expert, model=MODEL) == steps
        assert value(scraped, "gatemix_spec_decode_draft_tokens_total", expert=expert,
                     model=MODEL) == drafted
        assert value(scraped, "gatemix_spec_decode_accepted_tokens_total", expert=expert,
                     model=MODEL) == accepted


def test_errors_queue_and_gate_info(metrics):
    metrics.observe_error(400)
    metrics.observe_error(400)
    metrics.observe_error(503)
    metrics.set_queue(running=4, waiting=2)
    scraped = samples(metrics.render()[0])
    assert value(scraped, "gatemix_request_errors_total", code="400") == 2
    assert value(scraped, "gatemix_request_errors_total", code="503") == 1
    assert value(scraped, "gatemix_request_errors_total", code="500") == 0  # pre-created
    assert value(scraped, "gatemix_requests_running") == 4
    assert value(scraped, "gatemix_requests_waiting") == 2
    assert value(scraped, "gatemix_gate_info", version="learned-abc123") == 1
    assert value(scraped, "gatemix_gate_loaded_timestamp_seconds") == 1700000000.0
    metrics.set_gate("learned-def456", 1700000100.0)
    scraped = samples(metrics.render()[0])
    assert value(scraped, "gatemix_gate_info", version="learned-abc123") == 0
    assert value(scraped, "gatemix_gate_info", version="learned-def456") == 1


def test_instances_are_independent_and_include_the_global_registry():
    """Tests build several GateMetrics; vLLM's metrics live in the global REGISTRY."""
    first = GateMetrics(EXPERTS, "v1", 0.0)
    second = GateMetrics(EXPERTS, "v2", 0.0)
    observe_choices(first)
    assert ("gatemix_requests_total", frozenset({("model", MODEL)})) not in \
        samples(second.render()[0])
    # The default REGISTRY's process collector shows up next to ours, once.
    body, content_type = first.render()
    assert content_type.startswith("text/plain")
    names = [f.name for f in text_string_to_metric_families(body.decode())]
    assert len(names) == len(set(names))
    if sys.platform == "linux":
        assert "process_cpu_seconds" in names


def test_explicit_registry_is_rendered_once():
    registry = CollectorRegistry()
    Counter("vllm:like_metric", "a metric another library put in the same registry",
            registry=registry).inc()
    metrics = GateMetrics(EXPERTS, "v1", 0.0, registry=registry)
    scraped = samples(metrics.render()[0])
    assert value(scraped, "vllm:like_metric_total") == 1


# One writer process: observes the CHOICES for a model and sets the queue, then exits.
WRITER = textwrap.dedent("""
    import sys
    from gatemix.server.metrics import GateMetrics
    sys.path.insert(0, {tests_dir!r})
    from test_gate_metrics import EXPERTS, observe_choices
    metrics = GateMetrics(EXPERTS, "v1", 1700000000.0)
    assert metrics.multiprocess
    observe_choices(metrics, model=sys.argv[1])
    metrics.observe_error(429)
    metrics.set_queue(running=int(sys.argv[2]), waiting=1)
""")

READER = textwrap.dedent("""
    import sys
    from gatemix.server.metrics import GateMetrics
    metrics = GateMetrics(["code", "legal", "medical"], "v1", 1700000000.0)
    sys.stdout.write(metrics.render()[0].decode())
""")


def test_multiprocess_mode_aggregates_writers(tmp_path):
    """Two processes write (like two uvicorn workers), a third renders /metrics."""
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(tmp_path))
    writer = WRITER.format(tests_dir=os.path.dirname(__file__))
    # Two writers on the same model and one on another: counters add up across pids.
    for model, running in ((MODEL, 2), (MODEL, 3), ("code", 5)):
        subprocess.run([sys.executable, "-c", writer, model, str(running)], env=env,
                       check=True, timeout=60)
    body = subprocess.run([sys.executable, "-c", READER], env=env, check=True, timeout=60,
                          capture_output=True).stdout
    scraped = samples(body)
    for expert in EXPERTS:
        expected = 2 * sum(weights[expert] for weights, _ in CHOICES)
        assert value(scraped, "gatemix_gate_weight_sum", expert=expert, model=MODEL) == \
            pytest.approx(expected)
    assert value(scraped, "gatemix_dominant_expert_requests_total", expert="code",
                 model=MODEL) == 4
    assert value(scraped, "gatemix_generation_tokens_total", model=MODEL) == 40
    assert value(scraped, "gatemix_generation_tokens_total", model="code") == 20
    assert value(scraped, "gatemix_request_errors_total", code="429") == 3
    # livesum: the dead writers were never marked dead, so their queues still add up,
    # plus the reader's own zeros; mark_process_dead is what drops them.
    assert value(scraped, "gatemix_requests_running") == 10
    # max: one gate_info series, not one per process.
    assert value(scraped, "gatemix_gate_info", version="v1") == 1
    assert not any(name == "gatemix_gate_info" and dict(labels).get("pid")
                   for name, labels in scraped)
    assert math.isclose(value(scraped, "gatemix_gate_loaded_timestamp_seconds"), 1700000000.0)


def test_mark_process_dead_drops_its_queue(tmp_path):
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(tmp_path))
    script = textwrap.dedent("""
        import os, sys
        from gatemix.server.metrics import GateMetrics
        metrics = GateMetrics(["a", "b"], "v1", 0.0)
        metrics.set_queue(running=7, waiting=0)
        if sys.argv[1] == "dead":
            metrics.mark_process_dead()
        else:
            sys.stdout.write(metrics.render()[0].decode())
    """)
    subprocess.run([sys.executable, "-c", script, "dead"], env=env, check=True, timeout=60)
    body = subprocess.run([sys.executable, "-c", script, "read"], env=env, check=True,
                          timeout=60, capture_output=True).stdout
    assert value(samples(body), "gatemix_requests_running") == 7
