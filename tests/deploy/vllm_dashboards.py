"""The queries of the Grafana dashboards built for vLLM, which users point at gatemix unchanged.

Written out from the dashboards' panels, one entry per query, under the panel's title:

* ``VLLM_MODEL_DASHBOARD``: vLLM's example dashboard
  (``examples/online_serving/prometheus_grafana/grafana.json``) and production-stack's per-model
  dashboard (``helm/dashboards/vllm-model-metrics-dashboard.json``) have the same panels over the
  ``vllm:`` metrics, each filtered by ``model_name="$model_name"``; ``$model_name`` is chosen from
  ``label_values({__name__=~"vllm:.*"}, model_name)``.
* ``PRODUCTION_STACK_CLUSTER_DASHBOARD``: production-stack's cluster dashboard
  (``helm/dashboards/vllm-dashboard.json``), which reads the engines' ``vllm:`` metrics and its own
  router's.

``EMPTY_ON_GATEMIX`` names the queries that stay empty against gatemix, and why: each reason holds
for a plain vLLM server as well. The test checks both ways, so the list cannot go stale.
"""

from __future__ import annotations

QUANTILES = (0.99, 0.95, 0.9, 0.5)
MODEL = 'model_name="$model_name"'


def _latency_panel(histogram: str) -> list[str]:
    """P99/P95/P90/P50 and the mean of one latency histogram, as the dashboards draw it."""
    quantiles = [
        f"histogram_quantile({q}, sum by(le) (rate({histogram}_bucket{{{MODEL}}}[$__rate_interval])))"
        for q in QUANTILES
    ]
    mean = (f"rate({histogram}_sum{{{MODEL}}}[$__rate_interval])\n/\n"
            f"rate({histogram}_count{{{MODEL}}}[$__rate_interval])")
    return [*quantiles, mean]


VLLM_MODEL_DASHBOARD: dict[str, list[str]] = {
    "E2E Request Latency": _latency_panel("vllm:e2e_request_latency_seconds"),
    "Token Throughput": [
        f"rate(vllm:prompt_tokens_total{{{MODEL}}}[$__rate_interval])",
        f"rate(vllm:generation_tokens_total{{{MODEL}}}[$__rate_interval])",
    ],
    "Time Per Output Token Latency": _latency_panel("vllm:request_time_per_output_token_seconds"),
    "Scheduler State": [f"vllm:num_requests_running{{{MODEL}}}", f"vllm:num_requests_waiting{{{MODEL}}}"],
    "Time To First Token Latency": _latency_panel("vllm:time_to_first_token_seconds"),
    "Cache Utilization": [f"vllm:kv_cache_usage_perc{{{MODEL}}}"],
    "Request Prompt Length": [
        f"sum by(le) (increase(vllm:request_prompt_tokens_bucket{{{MODEL}}}[$__rate_interval]))"
    ],
    "Request Generation Length": [
        f"sum by(le) (increase(vllm:request_generation_tokens_bucket{{{MODEL}}}[$__rate_interval]))"
    ],
    "Finish Reason": [
        f"sum by(finished_reason) (increase(vllm:request_success_total{{{MODEL}}}[$__rate_interval]))"
    ],
    "Queue Time": [f"rate(vllm:request_queue_time_seconds_sum{{{MODEL}}}[$__rate_interval])"],
    "Requests Prefill and Decode Time": [
        f"rate(vllm:request_prefill_time_seconds_sum{{{MODEL}}}[$__rate_interval])",
        f"rate(vllm:request_decode_time_seconds_sum{{{MODEL}}}[$__rate_interval])",
    ],
    "Max Generation Token in Sequence Group": [
        f"rate(vllm:request_max_num_generation_tokens_sum{{{MODEL}}}[$__rate_interval])"
    ],
}

PRODUCTION_STACK_CLUSTER_DASHBOARD: dict[str, list[str]] = {
    "Available vLLM instances": ["sum(max by (server) (vllm:healthy_pods_total))"],
    "Average Latency": ["avg(vllm:e2e_request_latency_seconds_sum) / avg(vllm:e2e_request_latency_seconds_count)"],
    "Request latency distribution": ["sum by(le) (vllm:e2e_request_latency_seconds_bucket)"],
    "Current QPS": ["vllm:current_qps"],
    "Average ITL": [(
        "avg(vllm:request_time_per_output_token_seconds_sum)"
        " / avg(vllm:request_time_per_output_token_seconds_count)"
    )],
    "Request TTFT distribution": ["sum by(le) (vllm:time_to_first_token_seconds_bucket)"],
    "Number of Running Requests": ["vllm:num_requests_running"],
    "Number of Pending Requests": ["vllm:num_requests_waiting"],
    "GPU KV Usage Percentage": ["vllm:kv_cache_usage_perc"],
    "GPU KV Cache Hit Rate": [
        'vllm:gpu_prefix_cache_hits_total{endpoint="service-port"} / vllm:gpu_prefix_cache_queries_total'
    ],
    "GPU Cache Usage (%)": ["vllm:kv_cache_usage_perc"],
    "CPU Usage (%)": ["router_cpu_usage_percent"],
    "Memory Usage (%)": ["router_memory_usage_percent"],
    "Disk Usage (%)": ["router_disk_usage_percent"],
}

_ROUTER = "exported by production-stack's router, not by an engine server (vLLM's or gatemix's)"
EMPTY_ON_GATEMIX: dict[str, str] = {
    "sum(max by (server) (vllm:healthy_pods_total))": _ROUTER,
    "vllm:current_qps": _ROUTER,
    "router_cpu_usage_percent": _ROUTER,
    "router_memory_usage_percent": _ROUTER,
    "router_disk_usage_percent": _ROUTER,
    'vllm:gpu_prefix_cache_hits_total{endpoint="service-port"} / vllm:gpu_prefix_cache_queries_total': (
        "vLLM 0.32 names these vllm:prefix_cache_hits_total / vllm:prefix_cache_queries_total, and the "
        "endpoint label comes from Kubernetes service discovery"
    ),
}


def dashboard_queries() -> dict[str, list[str]]:
    """``"dashboard / panel"`` -> its queries, for both dashboards."""
    return {
        **{f"vLLM / {title}": exprs for title, exprs in VLLM_MODEL_DASHBOARD.items()},
        **{f"production-stack cluster / {title}": exprs
           for title, exprs in PRODUCTION_STACK_CLUSTER_DASHBOARD.items()},
    }
