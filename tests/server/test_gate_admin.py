"""The gate swapped while the server serves: POST /admin/gate under load, refusals, SIGHUP.

The routed server's composite holds a random router, whose per-token weights
vary with the context; the gate swapped in is a constant one. So a stream in
flight across the swap must keep the random router's weights (checked against
the offline router) and report the old version, while a request after it gets
the constant weights and the new version, in its response, in /v1/models and
in ``gatemix_gate_info``. Every test swaps the original gate back.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import pytest
import torch
from conftest import ADMIN_KEY
from server_harness import ENSEMBLE, post_gate
from test_routed_mixture_report import offline_weights

from gatemix.engine.composite_folder import GATE_SUBDIR
from gatemix.engine.pack import parse_gate_spec
from gatemix.expert_folder import read_expert
from gatemix.gate.artifact import load_router, save_router

CONSTANT = [0.7, 0.2, 0.1]
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture(scope="module")
def gates(routed_server, demo_paths, tmp_path_factory):
    """Artifacts for the routed composite's experts: a constant gate, one for another order, a corrupt one."""
    root = tmp_path_factory.mktemp("gates")
    experts = [read_expert(path, name) for name, path in demo_paths.expert_dirs.items()]
    constant = save_router(parse_gate_spec(",".join(map(str, CONSTANT)), experts), root / "constant")
    save_router(parse_gate_spec("uniform", experts[::-1]), root / "other-order")
    (root / "corrupt").mkdir()
    (root / "corrupt" / "router.json").write_text('{"format": "gatemix-router/1", "form": ')
    (root / "corrupt" / "router.safetensors").write_bytes(b"\0" * 8)
    original = load_router(routed_server.model_dir / GATE_SUBDIR)
    return root, constant.version, original.version


def _served_version(url: str) -> str:
    cards = httpx.get(f"{url}/v1/models").json()["data"]
    return next(card for card in cards if card["id"] == ENSEMBLE)["gate"]["version"]


def _gate_info(url: str) -> dict[str, float]:
    values = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("gatemix_gate_info{"):
            version = line.split('version="', 1)[1].split('"', 1)[0]
            values[version] = float(line.rsplit(" ", 1)[1])
    return values


def _stream(client, results: dict, key: str, started: threading.Event) -> None:
    chunks = client.completions.create(
        model=ENSEMBLE, prompt="def parse(text):", max_tokens=120, temperature=0.0, stream=True,
        extra_body={"ignore_eos": True, "mixture": {"per_token": True}, "return_token_ids": True},
    )
    records = []
    for chunk in chunks:
        records.append(chunk)
        started.set()
        time.sleep(0.01)
    results[key] = records


@pytest.mark.slow
def test_a_reload_under_load_spares_streams_in_flight_and_serves_new_requests(
    routed_server, routed_client, offline_router, gates
):
    root, new_version, original = gates
    url = routed_server.base_url
    results, started = {}, threading.Event()
    stream = threading.Thread(target=_stream, args=(routed_client, results, "in flight", started))
    stream.start()
    try:
        assert started.wait(60)
        response = post_gate(url, root / "constant", ADMIN)
        assert response.status_code == 200, response.text
        assert response.json() == {"version": new_version, "method": "constant", "previous_version": original}
        stream.join(120)
        after = routed_client.completions.create(
            model=ENSEMBLE, prompt="def parse(text):", max_tokens=8, temperature=0.0,
            extra_body={"mixture": {"per_token": True}},
        )
        assert _served_version(url) == new_version
        served = _gate_info(url)  # other tests on this server may have swapped gates in and out too
        assert served[original] == 0.0 and served[new_version] == 1.0 and sum(served.values()) == 1.0
    finally:
        assert post_gate(url, routed_server.model_dir / GATE_SUBDIR, ADMIN).status_code == 200

    chunks = results["in flight"]
    assert {c.choices[0].model_extra["mixture"]["gate_version"] for c in chunks if c.choices} == {original}
    token_ids = [t for c in chunks if c.choices for t in (c.choices[0].model_extra.get("token_ids") or [])]
    per_token = [w for c in chunks if c.choices for w in (c.choices[0].model_extra["mixture"]["per_token"] or [])]
    prompt_ids = next(c.choices[0].model_extra["prompt_token_ids"] for c in chunks
                      if c.choices and c.choices[0].model_extra.get("prompt_token_ids"))
    assert len(per_token) == len(token_ids) == 120
    expected = offline_weights(offline_router, prompt_ids, token_ids)
    torch.testing.assert_close(torch.tensor(per_token, dtype=torch.float64), expected, atol=1e-4, rtol=0)
    report = after.choices[0].model_extra["mixture"]
    assert report["gate_version"] == new_version
    torch.testing.assert_close(torch.tensor(report["per_token"]), torch.tensor([CONSTANT] * 8), atol=1e-5, rtol=0)
    assert _served_version(url) == original


@pytest.mark.slow
@pytest.mark.parametrize("artifact, status, fragment", [
    ("other-order", 400, "in that order"),
    ("corrupt", 400, "unreadable router artifact"),
    ("missing", 400, "not a router artifact"),
])
def test_a_bad_gate_is_refused_and_the_old_one_serves(routed_server, routed_client, gates, artifact, status, fragment):
    root, _, original = gates
    response = post_gate(routed_server.base_url, root / artifact, ADMIN)
    assert response.status_code == status and fragment in response.json()["error"]["message"]
    assert response.json()["error"]["param"] == "path"
    assert _served_version(routed_server.base_url) == original
    good = routed_client.completions.create(model=ENSEMBLE, prompt="x = ", max_tokens=2)
    assert good.choices[0].model_extra["mixture"]["gate_version"] == original


@pytest.mark.slow
def test_the_admin_api_takes_its_own_key(routed_server, gates):
    # A server started without --admin-key refuses it with 403: test_auth.py.
    root, _, original = gates
    assert post_gate(routed_server.base_url, root / "constant", {}).status_code == 401
    assert post_gate(routed_server.base_url, root / "constant", {"Authorization": "Bearer no"}).status_code == 401
    assert _served_version(routed_server.base_url) == original


@pytest.mark.slow
def test_sighup_rereads_the_configured_artifact(routed_server, gates):
    root, new_version, original = gates
    url = routed_server.base_url
    save_router(load_router(root / "constant"), routed_server.gate_artifact)
    try:
        os.kill(routed_server.pid, signal.SIGHUP)
        deadline = time.time() + 30
        while _served_version(url) != new_version and time.time() < deadline:
            time.sleep(0.2)
        assert _served_version(url) == new_version
    finally:
        assert post_gate(url, routed_server.model_dir / GATE_SUBDIR, ADMIN).status_code == 200
    assert _served_version(url) == original
