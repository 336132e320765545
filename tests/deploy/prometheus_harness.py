"""A real Prometheus server on loopback for tests, and the dashboard's PromQL.

    with run_prometheus("127.0.0.1:8000", tmp_path) as base_url:
        ...  # send requests; Prometheus scrapes /metrics every second
        for expr in dashboard_exprs(DASHBOARD):
            assert query(base_url, expr)

Uses Debian's ``prometheus`` binary (``make prometheus`` installs it).
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

PROMETHEUS_BINARY = "prometheus"
SCRAPE_INTERVAL_S = 1.0

# Values for Grafana's built-in and dashboard variables in instant queries. The rate
# windows span the whole of a short test, so every rate and quantile has samples.
DEFAULT_VARIABLES = {
    "__rate_interval": "1m",
    "__interval": "1s",
    "__range": "5m",
    "model": ".*",
    "expert": ".*",
    "datasource": "prometheus",
}

_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")


class PrometheusError(RuntimeError):
    """Prometheus did not start, or a query failed."""


def prometheus_binary() -> str | None:
    return shutil.which(PROMETHEUS_BINARY)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get_json(url: str, timeout: float = 10.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.load(response)


@contextlib.contextmanager
def run_prometheus(scrape_target: str, tmp_dir: str | Path,
                   ready_timeout_s: float = 60.0) -> Iterator[str]:
    """Start Prometheus scraping ``scrape_target`` ("host:port", path /metrics) every
    second; yield its base URL ("http://127.0.0.1:PORT"); stop it on exit."""
    binary = prometheus_binary()
    if binary is None:
        raise PrometheusError("no `prometheus` binary on PATH (run `make prometheus`)")
    tmp_dir = Path(tmp_dir)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    config = tmp_dir / "prometheus.yml"
    config.write_text(
        f"global:\n  scrape_interval: {SCRAPE_INTERVAL_S:g}s\n"
        f"  evaluation_interval: {SCRAPE_INTERVAL_S:g}s\n"
        "scrape_configs:\n  - job_name: gatemix\n    metrics_path: /metrics\n"
        f"    static_configs:\n      - targets: [{json.dumps(scrape_target)}]\n")
    port = _free_port()
    base_url = f"http://127.0.0.1:{port}"
    log_path = tmp_dir / "prometheus.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_dir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}", "--web.enable-lifecycle",
             "--storage.tsdb.retention.time=1d"],
            stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_ready(base_url, process, log_path, ready_timeout_s)
        yield base_url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_ready(base_url: str, process: subprocess.Popen, log_path: Path,
                timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise PrometheusError(f"prometheus exited with {process.returncode}:\n"
                                  + log_path.read_text()[-2000:])
        try:
            with urllib.request.urlopen(base_url + "/-/ready", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(0.2)
    raise PrometheusError(f"prometheus not ready after {timeout_s:g}s:\n"
                          + log_path.read_text()[-2000:])


def _api(base_url: str, endpoint: str, params: dict) -> dict:
    url = f"{base_url}/api/v1/{endpoint}?{urllib.parse.urlencode(params)}"
    try:
        body = _get_json(url)
    except urllib.error.HTTPError as exc:
        raise PrometheusError(f"{endpoint} {params}: {exc.read().decode()[:500]}") from exc
    if body.get("status") != "success":
        raise PrometheusError(f"{endpoint} {params}: {body}")
    return body["data"]


def query(base_url: str, promql: str, at: float | None = None) -> list:
    """Instant query: the result list of ``/api/v1/query`` (``[{"metric", "value"}]``
    for a vector; a scalar comes back as one ``{"metric": {}, "value"}`` entry)."""
    params = {"query": promql}
    if at is not None:
        params["time"] = f"{at:.3f}"
    data = _api(base_url, "query", params)
    if data["resultType"] in ("scalar", "string"):
        return [{"metric": {}, "value": data["result"]}]
    return data["result"]


def query_range(base_url: str, promql: str, start: float, end: float, step_s: float) -> list:
    """Range query: ``[{"metric": {...}, "values": [[t, "v"], ...]}]``."""
    data = _api(base_url, "query_range", {"query": promql, "start": f"{start:.3f}",
                                          "end": f"{end:.3f}", "step": f"{step_s:g}"})
    return data["result"]


def label_values(base_url: str, label: str, match: str | None = None) -> list[str]:
    params = {"match[]": match} if match else {}
    return _api(base_url, f"label/{label}/values", params)


def targets_up(base_url: str) -> bool:
    """Whether every scrape target's last scrape succeeded."""
    targets = _api(base_url, "targets", {})["activeTargets"]
    return bool(targets) and all(t["health"] == "up" for t in targets)


def substitute(expr: str, variables: dict[str, str]) -> str:
    """Replace Grafana variables (``$name``, ``${name}``, ``${name:format}``)."""
    def replace(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        if name not in variables:
            raise KeyError(f"no value for Grafana variable ${name} in {expr!r}")
        return variables[name]
    return _VARIABLE.sub(replace, expr)


def dashboard_panels(path: str | Path) -> list[dict]:
    """Every panel of the dashboard, those inside collapsed rows included."""
    dashboard = json.loads(Path(path).read_text())
    panels = []
    for panel in dashboard.get("panels", []):
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def panel_exprs(panel: dict, variables: dict[str, str] | None = None) -> list[str]:
    values = {**DEFAULT_VARIABLES, **(variables or {})}
    return [substitute(t["expr"], values) for t in panel.get("targets", []) if t.get("expr")]


def dashboard_exprs(path: str | Path, variables: dict[str, str] | None = None) -> list[str]:
    """Every PromQL ``expr`` in the dashboard, with Grafana variables replaced by
    ``DEFAULT_VARIABLES`` overridden by ``variables``."""
    return [expr for panel in dashboard_panels(path) for expr in panel_exprs(panel, variables)]
