"""API keys: /v1/* need one of the configured keys; /health and /metrics stay open; the admin
API is off without ``--admin-key``, whatever key is sent."""

from __future__ import annotations

import httpx
import openai
import pytest
from server_harness import post_gate

from gatemix.engine.composite_folder import GATE_SUBDIR

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic abc"}],
    ids=["missing", "wrong", "not-bearer"],
)
def test_missing_or_wrong_key_gets_401_in_openai_format(server, headers):
    for method, path in (
        ("POST", "/v1/completions"),
        ("POST", "/v1/chat/completions"),
        ("GET", "/v1/models"),
        ("GET", f"/v1/models/{server.ensemble}"),
    ):
        response = httpx.request(
            method, server.base_url + path, headers=headers, json={"prompt": "x"}
        )
        assert response.status_code == 401
        error = response.json()["error"]
        assert error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error"


def test_every_configured_key_is_accepted(server):
    for key in server.api_keys:
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=key, max_retries=0)
        assert client.models.list().data[0].id == server.ensemble


def test_openai_client_with_a_wrong_key_raises_authentication_error(server):
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.completions.create(model=server.ensemble, prompt="x", max_tokens=1)


def test_health_and_metrics_need_no_key(server):
    assert httpx.get(f"{server.base_url}/health").status_code == 200
    metrics = httpx.get(f"{server.base_url}/metrics")
    assert metrics.status_code == 200 and "gatemix_" in metrics.text
    assert httpx.get(f"{server.base_url}/openapi.json").json()["info"]["title"] == "gatemix"


def test_without_an_admin_key_the_admin_api_is_off_even_for_api_keys(server):
    # The served gate's own artifact: were it not refused, it would load.
    for key in server.api_keys:
        response = post_gate(server.base_url, server.model_dir / GATE_SUBDIR, {"Authorization": f"Bearer {key}"})
        assert response.status_code == 403 and "--admin-key" in response.json()["error"]["message"]
