"""deploy/ and the Dockerfile are well-formed: checked without Docker, Grafana or a cluster."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from prometheus_harness import dashboard_exprs

from gatemix.server.choices import DraftAcceptance
from gatemix.server.metrics import GateMetrics

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY = REPO_ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "gatemix.json"
K8S = DEPLOY / "k8s"


# --- Grafana dashboard -------------------------------------------------------------------

@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def all_panels(dashboard: dict) -> list[dict]:
    return [p for top in dashboard["panels"] for p in (top, *top.get("panels", []))]


def test_panel_ids_are_unique(dashboard):
    ids = [p["id"] for p in all_panels(dashboard)]
    assert len(ids) == len(set(ids))


def test_datasource_variable_is_used_by_every_panel_and_query(dashboard):
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    uses_variable = {"type": "prometheus", "uid": "${datasource}"}
    for panel in all_panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == uses_variable, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == uses_variable, panel["title"]
    for variable in variables.values():
        if variable["type"] == "query":
            assert variable["datasource"] == uses_variable, variable["name"]


def test_dashboard_covers_the_operator_panels(dashboard):
    text = json.dumps(dashboard)
    kinds = {p["type"] for p in all_panels(dashboard)}
    assert {"timeseries", "heatmap", "stat", "bargauge"} <= kinds
    for metric in ("gatemix_gate_weighted_tokens_total", "gatemix_gate_weight_bucket",
                   "gatemix_dominant_expert_requests_total", "gatemix_generation_tokens_total",
                   "gatemix_time_to_first_token_seconds_bucket",
                   "gatemix_inter_token_latency_seconds_bucket",
                   "gatemix_request_errors_total", "gatemix_gate_info"):
        assert metric in text, metric
    for quantile in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({quantile}," in text
    stacked = [p for p in all_panels(dashboard) if p.get("fieldConfig", {}).get("defaults", {})
               .get("custom", {}).get("stacking", {}).get("mode") == "normal"]
    assert any("gatemix_gate_weighted_tokens_total" in json.dumps(p) for p in stacked)


# A PromQL identifier that names a metric: not followed by "(" (a function) and not
# a label name inside braces, "by (...)" lists or a string.
_IDENTIFIER = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_NOT_METRICS = {"sum", "max", "min", "avg", "rate", "increase", "by", "without", "ignoring",
                "on", "group_left", "group_right", "histogram_quantile", "and", "or",
                "unless", "bool", "offset", "count", "scalar", "vector"}


def metric_names(expr: str) -> set[str]:
    expr = re.sub(r'"[^"]*"', '""', expr)           # strings
    expr = re.sub(r"\{[^}]*\}", "{}", expr)         # label matchers
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "[]", expr)        # range selectors
    names = set()
    for match in _IDENTIFIER.finditer(expr):
        name = match.group(0)
        rest = expr[match.end():].lstrip()
        if name not in _NOT_METRICS and not rest.startswith("(") and not name[0].isdigit():
            names.add(name)
    return names


def test_metric_name_parser():
    assert metric_names('sum by (le) (rate(a_bucket{model=~"x"}[1m])) / ignoring(expert) '
                        'group_left sum(rate(b_total[5m])) * 1000') == {"a_bucket", "b_total"}


def test_every_dashboard_metric_is_exposed_after_one_request(dashboard):
    metrics = GateMetrics(["code", "legal"], gate_version="v1", gate_loaded_at=1.0)
    metrics.observe_request(model="gatemix-demo", mean_weights={"code": 0.6, "legal": 0.4},
                            token_weight_sums={"code": 1.2, "legal": 0.8}, prompt_tokens=4,
                            generation_tokens=2, ttft_s=0.01, itl_s=[0.01], e2e_s=0.02,
                            draft_acceptance=DraftAcceptance(1, 3, 1))  # served behind a draft
    exposed = {sample.name
               for family in text_string_to_metric_families(metrics.render()[0].decode())
               for sample in family.samples}
    referenced = set().union(*(metric_names(e) for e in dashboard_exprs(DASHBOARD)))
    assert referenced, "no metric names found"
    assert referenced <= exposed, sorted(referenced - exposed)
    # Template variables: label_values(metric, label) names an exposed metric and label.
    labels_of = {}
    for family in text_string_to_metric_families(metrics.render()[0].decode()):
        for sample in family.samples:
            labels_of.setdefault(sample.name, set()).update(sample.labels)
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            metric, label = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)",
                                         variable["definition"]).groups()
            assert label in labels_of[metric], variable["name"]


# --- docker-compose ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def test_compose_runs_gatemix_on_a_gpu_with_prometheus_and_grafana(compose):
    services = compose["services"]
    assert {"gatemix", "prometheus", "grafana"} <= services.keys()
    devices = services["gatemix"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert services["gatemix"]["build"]["dockerfile"] == "Dockerfile"
    assert (DEPLOY / services["gatemix"]["build"]["context"] / "Dockerfile").is_file()
    assert "8000:8000" in services["gatemix"]["ports"]
    named_volumes = set(compose.get("volumes", {}))
    for name, service in services.items():
        for depends in service.get("depends_on", []):
            assert depends in services, (name, depends)
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("${"):
                continue  # the model folder comes from the environment
            if source.startswith("."):
                assert (DEPLOY / source).exists(), (name, source)
            else:
                assert source in named_volumes, (name, source)


def test_compose_mounts_the_provisioning_and_scrapes_gatemix(compose):
    grafana_volumes = compose["services"]["grafana"]["volumes"]
    mounted = {v.split(":")[1]: v.split(":")[0] for v in grafana_volumes}
    assert mounted["/etc/grafana/provisioning/datasources"] == \
        "./grafana/provisioning/datasources"
    assert mounted["/var/lib/grafana/dashboards"] == "./grafana/dashboards"
    provider = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/dashboards/gatemix.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    datasource = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    assert datasource["datasources"][0]["type"] == "prometheus"
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    scrape = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    (job,) = scrape["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["gatemix:8000"]


@pytest.mark.skipif(shutil.which("promtool") is None, reason="no promtool (`make prometheus`)")
def test_promtool_accepts_the_scrape_config():
    result = subprocess.run(["promtool", "check", "config",
                             str(DEPLOY / "prometheus/prometheus.yml")],
                            check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# --- Kubernetes ---------------------------------------------------------------------------

_NAME = {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63}
_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
_METADATA = {"type": "object", "required": ["name"],
             "properties": {"name": _NAME, "labels": _LABELS}}
_PORT_REF = {"anyOf": [{"type": "integer", "minimum": 1, "maximum": 65535}, _NAME]}
_PROBE = {"type": "object", "required": ["httpGet"], "properties": {
    "httpGet": {"type": "object", "required": ["path", "port"],
                "properties": {"path": {"type": "string"}, "port": _PORT_REF}},
    "periodSeconds": {"type": "integer", "minimum": 1},
    "timeoutSeconds": {"type": "integer", "minimum": 1},
    "failureThreshold": {"type": "integer", "minimum": 1}}}
_QUANTITY = {"anyOf": [{"type": "integer", "minimum": 0},
                       {"type": "string", "pattern": r"^[0-9.]+(m|Ki|Mi|Gi|Ti|k|M|G)?$"}]}
_RESOURCES = {"type": "object", "properties": {
    "requests": {"type": "object", "additionalProperties": _QUANTITY},
    "limits": {"type": "object", "required": ["nvidia.com/gpu"],
               "additionalProperties": _QUANTITY}}}
_CONTAINER = {"type": "object", "required": ["name", "image", "ports", "resources",
                                             "livenessProbe", "readinessProbe"],
              "properties": {
                  "name": _NAME, "image": {"type": "string"},
                  "env": {"type": "array", "items": {
                      "type": "object", "required": ["name"],
                      "properties": {"name": {"type": "string"}, "value": {"type": "string"}}}},
                  "ports": {"type": "array", "items": {
                      "type": "object", "required": ["containerPort"],
                      "properties": {"name": _NAME, "containerPort": _PORT_REF,
                                     "protocol": {"enum": ["TCP", "UDP"]}}}},
                  "resources": _RESOURCES, "livenessProbe": _PROBE,
                  "readinessProbe": _PROBE, "startupProbe": _PROBE}}
SCHEMAS = {
    ("apps/v1", "Deployment"): {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {"metadata": _METADATA, "spec": {
            "type": "object", "required": ["selector", "template"],
            "properties": {
                "replicas": {"type": "integer", "minimum": 0},
                "selector": {"type": "object", "required": ["matchLabels"],
                             "properties": {"matchLabels": _LABELS}},
                "template": {"type": "object", "required": ["metadata", "spec"], "properties": {
                    "metadata": {"type": "object", "required": ["labels"],
                                 "properties": {"labels": _LABELS}},
                    "spec": {"type": "object", "required": ["containers"], "properties": {
                        "containers": {"type": "array", "minItems": 1, "items": _CONTAINER},
                        "securityContext": {"type": "object", "properties": {
                            "runAsNonRoot": {"const": True},
                            "runAsUser": {"type": "integer", "minimum": 1}}}}}}}}}}},
    ("v1", "Service"): {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {"metadata": _METADATA, "spec": {
            "type": "object", "required": ["selector", "ports"], "properties": {
                "type": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
                "selector": _LABELS,
                "ports": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["port", "targetPort"],
                    "properties": {"name": _NAME, "port": _PORT_REF,
                                   "targetPort": _PORT_REF}}}}}}},
    ("monitoring.coreos.com/v1", "ServiceMonitor"): {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {"metadata": _METADATA, "spec": {
            "type": "object", "required": ["selector", "endpoints"], "properties": {
                "selector": {"type": "object", "required": ["matchLabels"],
                             "properties": {"matchLabels": _LABELS}},
                "endpoints": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["port"], "properties": {
                        "port": _NAME, "path": {"type": "string", "pattern": "^/"},
                        "interval": {"type": "string", "pattern": r"^[0-9]+(ms|s|m)$"}}}}}}}},
    ("v1", "PersistentVolumeClaim"): {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {"metadata": _METADATA}},
}


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    docs = [doc for path in kustomization["resources"]
            for doc in yaml.safe_load_all((K8S / path).read_text()) if doc]
    return {doc["kind"]: doc for doc in docs}


def test_manifests_match_their_schemas(manifests):
    assert {"Deployment", "Service", "ServiceMonitor"} <= manifests.keys()
    for kind, doc in manifests.items():
        jsonschema.validate(doc, SCHEMAS[doc["apiVersion"], kind])


def test_schema_rejects_a_deployment_without_gpu():
    doc = yaml.safe_load((K8S / "deployment.yaml").read_text())
    del doc["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, SCHEMAS["apps/v1", "Deployment"])


def test_probes_service_and_monitor_line_up(manifests):
    deployment, service, monitor = (manifests[k] for k in
                                    ("Deployment", "Service", "ServiceMonitor"))
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    ports = {p.get("name"): p["containerPort"] for p in container["ports"]}
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/health"
        assert get["port"] in ports or get["port"] in ports.values()
    # The selector picks the pods, and the Service targets the container's port.
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    (service_port,) = service["spec"]["ports"]
    target = service_port["targetPort"]
    assert ports.get(target, target) in ports.values()
    # The ServiceMonitor selects the Service and scrapes its named port.
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == service_port["name"]
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    # The container listens where its settings say.
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert int(env["GATEMIX_PORT"]) == ports["http"]
    assert env["GATEMIX_HOST"] == "0.0.0.0"


# --- Dockerfile ---------------------------------------------------------------------------

def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (REPO_ROOT / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, rest = line.partition(" ")
            out.append((instruction.upper(), rest.strip()))
    return out


def test_dockerfile_builds_on_a_pinned_vllm_openai_image():
    (base,) = [rest for ins, rest in dockerfile_instructions() if ins == "FROM"]
    image, _, tag = base.partition(":")
    assert image == "vllm/vllm-openai"
    assert re.fullmatch(r"v\d+\.\d+\.\d+", tag), tag


def test_dockerfile_installs_gatemix_as_a_package():
    runs = " ".join(rest for ins, rest in dockerfile_instructions() if ins == "RUN")
    assert re.search(r"pip install [^&]*\.(\s|$)", runs)
    assert "-e ." not in runs and "--editable" not in runs  # entry points need a real install
    copied = {shlex.split(rest)[-2] for ins, rest in dockerfile_instructions() if ins == "COPY"}
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    package_dirs = set(pyproject["tool"]["setuptools"]["package-dir"].values())
    assert package_dirs <= copied, sorted(package_dirs - copied)


def test_dockerfile_runs_as_non_root_with_healthcheck_and_entrypoint():
    instructions = dockerfile_instructions()
    users = [rest for ins, rest in instructions if ins == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    (healthcheck,) = [rest for ins, rest in instructions if ins == "HEALTHCHECK"]
    assert "/health" in healthcheck and "CMD" in healthcheck
    (entrypoint,) = [rest for ins, rest in instructions if ins == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["gatemix", "serve"]
    env = " ".join(rest for ins, rest in instructions if ins == "ENV")
    (exposed,) = [rest for ins, rest in instructions if ins == "EXPOSE"]
    assert f"GATEMIX_PORT={exposed}" in env and "GATEMIX_HOST=0.0.0.0" in env
