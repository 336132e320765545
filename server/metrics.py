"""Prometheus metrics for ``GET /metrics``: what the gate does, and how fast.

Operators watch the gate first: which expert carries which traffic, and how that
shifts. So besides the usual latency and token counters, every finished choice
records its gate weights three ways:

* ``gatemix_gate_weight`` - a histogram of the choice's mean weight per expert
  (the weight distribution; ``_sum / _count`` is the mean over choices);
* ``gatemix_gate_weighted_tokens_total`` - the sum of weights over generated
  tokens, so ``rate(weighted) / rate(generation_tokens)`` is the token-level
  mixture, the share of generated text each expert carried;
* ``gatemix_dominant_expert_requests_total`` - the expert with the largest mean.

Served behind a draft (``--draft``), each finished choice also adds its
speculative steps, proposed and accepted draft tokens under its dominant expert
(``gatemix_spec_decode_*_total``), so acceptance shows per kind of traffic:
a draft distilled from the ensemble is accepted more on some domains than on
others. vLLM's own ``vllm:spec_decode_*`` counters give the engine-wide figure.

Several processes: with ``PROMETHEUS_MULTIPROC_DIR`` set *before*
``prometheus_client`` is imported (uvicorn workers, vLLM API-server processes),
every process writes its values to memory-mapped files there and ``render()``
aggregates all of them, vLLM's own ``vllm:`` metrics included, with a
``MultiProcessCollector``. Otherwise metrics live in a private registry (tests
build several ``GateMetrics``) and ``render()`` appends the process-global
``REGISTRY``, where vLLM's ``AsyncLLM`` registers its ``vllm:`` metrics.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)
from prometheus_client.metrics_core import Metric

from gatemix.server.choices import DraftAcceptance

logger = logging.getLogger(__name__)

PREFIX = "gatemix_"

# Mean gate weight in [0, 1]: 20 equal-width buckets, so the heatmap has even rows.
WEIGHT_BUCKETS = tuple(round(0.05 * i, 2) for i in range(1, 21))
# Seconds; the same spread vLLM uses, from a CPU toy to a loaded GPU.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
                1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.05, 0.075, 0.1,
               0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
               40.0, 50.0, 60.0, 120.0, 240.0, 480.0)
# Pre-created with value 0 so that error-rate queries return data before any error.
COMMON_ERROR_CODES = (400, 401, 404, 422, 500)


def multiprocess_dir() -> str | None:
    """The multiprocess directory when multiprocess mode is really in effect.

    ``prometheus_client`` picks its value storage once, at import; a directory
    set later would be aggregated but never written, so it does not count.
    """
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not path:
        return None
    if values.ValueClass is values.MutexValue:
        logger.warning("PROMETHEUS_MULTIPROC_DIR=%s was set after prometheus_client was "
                       "imported; metrics stay per-process", path)
        return None
    return path


def dominant_expert(mean_weights: dict[str, float]) -> str | None:
    """The expert with the largest mean weight; None when the weights are unknown."""
    return max(mean_weights, key=mean_weights.__getitem__) if mean_weights else None


class _Union:
    """A collector over several registries that yields each metric name once."""

    def __init__(self, registries: Iterable[CollectorRegistry]) -> None:
        self._registries = list(registries)

    def collect(self) -> Iterator[Metric]:
        seen: set[str] = set()
        for registry in self._registries:
            for metric in registry.collect():
                if metric.name not in seen:
                    seen.add(metric.name)
                    yield metric


class GateMetrics:
    """The server's metrics. ``observe_request`` is called once per finished choice.

    Args:
        expert_names: the ensemble's experts, in gate order (label values are created
            up front, so per-expert series exist from the first scrape).
        gate_version: shown as ``gatemix_gate_info{version=...} 1``.
        gate_loaded_at: Unix time (seconds) the gate was loaded.
        registry: where the metrics are registered; a private one by default.
    """

    def __init__(self, expert_names: list[str], gate_version: str, gate_loaded_at: float,
                 registry: CollectorRegistry | None = None) -> None:
        self.expert_names = list(expert_names)
        self.registry = registry if registry is not None else CollectorRegistry()
        self._multiprocess_dir = multiprocess_dir()
        self._gate_version: str | None = None
        self._create_metrics()
        for code in COMMON_ERROR_CODES:
            self.errors.labels(code=str(code))
        self.set_gate(gate_version, gate_loaded_at)
        self.set_queue(0, 0)

    def _create_metrics(self) -> None:
        r = self.registry
        by_expert = ["expert", "model"]
        self.gate_weight = Histogram(
            PREFIX + "gate_weight", "Mean gate weight of each finished choice, per expert.",
            by_expert, buckets=WEIGHT_BUCKETS, registry=r)
        self.weighted_tokens = Counter(
            PREFIX + "gate_weighted_tokens", "Generated tokens weighted by the expert's gate "
            "weight (sum of weights over tokens).", by_expert, registry=r)
        self.dominant = Counter(
            PREFIX + "dominant_expert_requests", "Finished choices whose largest mean gate "
            "weight belongs to the expert.", by_expert, registry=r)
        self.requests = Counter(
            PREFIX + "requests", "Finished choices (one per completion choice).", ["model"],
            registry=r)
        self.prompt_tokens = Counter(
            PREFIX + "prompt_tokens", "Prompt tokens of finished choices.", ["model"], registry=r)
        self.generation_tokens = Counter(
            PREFIX + "generation_tokens", "Generated tokens of finished choices.", ["model"],
            registry=r)
        self.e2e = Histogram(
            PREFIX + "e2e_request_latency_seconds", "Time from arrival to the last token.",
            ["model"], buckets=E2E_BUCKETS, registry=r)
        self.ttft = Histogram(
            PREFIX + "time_to_first_token_seconds", "Time from arrival to the first token.",
            ["model"], buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram(
            PREFIX + "inter_token_latency_seconds", "Time between consecutive output tokens.",
            ["model"], buckets=ITL_BUCKETS, registry=r)
        by_dominant = ["expert", "model"]  # the choice's dominant expert ("none": weights unknown)
        self.spec_steps = Counter(
            PREFIX + "spec_decode_steps", "Speculative verify steps of finished choices, by "
            "the choice's dominant expert.", by_dominant, registry=r)
        self.spec_draft_tokens = Counter(
            PREFIX + "spec_decode_draft_tokens", "Tokens the draft proposed for finished choices, "
            "by the choice's dominant expert.", by_dominant, registry=r)
        self.spec_accepted_tokens = Counter(
            PREFIX + "spec_decode_accepted_tokens", "Draft tokens the ensemble accepted for "
            "finished choices, by the choice's dominant expert.", by_dominant, registry=r)
        self.errors = Counter(
            PREFIX + "request_errors", "Requests answered with an error, by HTTP status code.",
            ["code"], registry=r)
        # Each API-server process counts its own requests; the total is their sum.
        self.running = Gauge(
            PREFIX + "requests_running", "Requests being generated.",
            registry=r, multiprocess_mode="livesum")
        self.waiting = Gauge(
            PREFIX + "requests_waiting", "Requests accepted but not yet started.",
            registry=r, multiprocess_mode="livesum")
        # Every process loads the same gate; max keeps one series instead of one per pid.
        self.gate_info = Gauge(
            PREFIX + "gate_info", "The loaded gate (value 1; the version is a label).",
            ["version"], registry=r, multiprocess_mode="max")
        self.gate_loaded = Gauge(
            PREFIX + "gate_loaded_timestamp_seconds", "Unix time the loaded gate was loaded.",
            registry=r, multiprocess_mode="max")

    @property
    def multiprocess(self) -> bool:
        return self._multiprocess_dir is not None

    def set_gate(self, version: str, loaded_at: float) -> None:
        """Record the loaded gate; a reload zeroes the previous version's series."""
        if self._gate_version is not None and self._gate_version != version:
            self.gate_info.labels(version=self._gate_version).set(0)
        self._gate_version = version
        self.gate_info.labels(version=version).set(1)
        self.gate_loaded.set(loaded_at)

    def observe_request(self, *, model: str, mean_weights: dict[str, float],
                        token_weight_sums: dict[str, float], prompt_tokens: int,
                        generation_tokens: int, ttft_s: float | None, itl_s: list[float],
                        e2e_s: float, draft_acceptance: DraftAcceptance | None = None) -> None:
        """Record one finished choice.

        Args:
            model: the model name the client asked for (ensemble or expert).
            mean_weights: expert -> mean gate weight over the generated tokens; empty when
                no token was generated or the weights went missing.
            token_weight_sums: expert -> sum of gate weights over the generated tokens.
            prompt_tokens, generation_tokens: token counts of this choice.
            ttft_s: seconds to the first token, None when none was generated.
            itl_s: seconds between consecutive tokens (generation_tokens - 1 entries).
            e2e_s: seconds from arrival to the end.
            draft_acceptance: the choice's speculative steps; None without a draft.
        """
        self.requests.labels(model=model).inc()
        self.prompt_tokens.labels(model=model).inc(prompt_tokens)
        self.generation_tokens.labels(model=model).inc(generation_tokens)
        self.e2e.labels(model=model).observe(e2e_s)
        ttft = self.ttft.labels(model=model)  # created even when unused: a 0 series
        if ttft_s is not None:
            ttft.observe(ttft_s)
        itl = self.itl.labels(model=model)
        for seconds in itl_s:
            itl.observe(seconds)
        for expert, weight_sum in token_weight_sums.items():
            self.weighted_tokens.labels(expert=expert, model=model).inc(weight_sum)
        if draft_acceptance is not None:
            self._observe_draft(model, dominant_expert(mean_weights) or "none", draft_acceptance)
        if not mean_weights:
            return
        for expert in self.expert_names:
            # Experts left out of a restricted mixture carried weight 0 for this choice.
            self.gate_weight.labels(expert=expert, model=model).observe(
                mean_weights.get(expert, 0.0))
        for expert in mean_weights.keys() - set(self.expert_names):
            self.gate_weight.labels(expert=expert, model=model).observe(mean_weights[expert])
        self.dominant.labels(expert=dominant_expert(mean_weights), model=model).inc()
        self._touch_experts(model)

    def _observe_draft(self, model: str, expert: str, acceptance: DraftAcceptance) -> None:
        self.spec_steps.labels(expert=expert, model=model).inc(acceptance.steps)
        self.spec_draft_tokens.labels(expert=expert, model=model).inc(acceptance.draft_tokens)
        self.spec_accepted_tokens.labels(expert=expert, model=model).inc(acceptance.accepted_tokens)

    def _touch_experts(self, model: str) -> None:
        """Create every expert's series for ``model`` so that rates and shares
        show 0 for experts that carried nothing, instead of no series at all."""
        for expert in self.expert_names:
            self.weighted_tokens.labels(expert=expert, model=model)
            self.dominant.labels(expert=expert, model=model)

    def observe_error(self, status_code: int) -> None:
        self.errors.labels(code=str(status_code)).inc()

    def set_queue(self, running: int, waiting: int) -> None:
        self.running.set(running)
        self.waiting.set(waiting)

    def mark_process_dead(self, pid: int | None = None) -> None:
        """In multiprocess mode, drop a finished process's live gauges (its queue)."""
        if self._multiprocess_dir is not None:
            multiprocess.mark_process_dead(os.getpid() if pid is None else pid,
                                           self._multiprocess_dir)

    def render(self) -> tuple[bytes, str]:
        """The exposition body for ``GET /metrics`` and its content type."""
        if self._multiprocess_dir is not None:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=self._multiprocess_dir)
            return generate_latest(registry), CONTENT_TYPE_LATEST
        sources = [self.registry] if self.registry is REGISTRY else [self.registry, REGISTRY]
        return generate_latest(_Union(sources)), CONTENT_TYPE_LATEST
