"""``--data-parallel-size 2``: two engine replicas behind one server, each request on one of them.

Per-request state lives in the worker that decodes the request (its gate
settings, its posterior state), so it needs nothing shared; what spans the
replicas is the gate trace (every replica's workers push to the server's one
socket) and a gate reload (vLLM sends a ``collective_rpc`` to every engine).
The routed session server runs two replicas (``conftest.routed_server``), on a
random router whose weights move with every token, so a trace record crossed
between two requests on two replicas would show. That the server admits the
slots of both replicas is ``test_limits``' queue test, on the same server.
"""

from __future__ import annotations

import concurrent.futures

import httpx
import torch
from conftest import ADMIN_KEY, ROUTED_MAX_NUM_SEQS, ROUTED_REPLICAS
from server_harness import ENSEMBLE, post_gate, wait_until_idle
from test_routed_mixture_report import offline_weights

from gatemix.engine.composite_folder import GATE_SUBDIR
from gatemix.engine.pack import parse_gate_spec
from gatemix.expert_folder import read_expert
from gatemix.gate.artifact import save_router

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
REQUESTS = ROUTED_REPLICAS * ROUTED_MAX_NUM_SEQS  # every slot of both replicas
TOKENS = 12
CONSTANT = [0.6, 0.3, 0.1]


def _completions(client) -> list:
    """``REQUESTS`` greedy completions at once, each with its per-token weights."""
    def one(index: int):
        return client.completions.create(
            model=ENSEMBLE, prompt=f"def parse_{index}(text): return text[{index}:]", max_tokens=TOKENS,
            temperature=0.0, extra_body={"ignore_eos": True, "mixture": {"per_token": True}, "return_token_ids": True},
        ).choices[0]

    with concurrent.futures.ThreadPoolExecutor(REQUESTS) as pool:
        return list(pool.map(one, range(REQUESTS)))


def _finished_per_engine(url: str) -> dict[str, float]:
    finished: dict[str, float] = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("vllm:request_success_total{"):
            engine = line.split('engine="', 1)[1].split('"', 1)[0]
            finished[engine] = finished.get(engine, 0.0) + float(line.rsplit(" ", 1)[1])
    return finished


def _served_by_both(url: str, before: dict[str, float]) -> None:
    after = _finished_per_engine(url)
    assert sorted(after) == ["0", "1"]
    assert all(after[engine] > before.get(engine, 0.0) for engine in after), (before, after)


def test_requests_on_both_replicas_get_their_own_exact_weights(routed_server, routed_client, offline_router):
    url = routed_server.base_url
    wait_until_idle(url, 30)
    before = _finished_per_engine(url)
    choices = _completions(routed_client)
    _served_by_both(url, before)
    for choice in choices:
        extra = choice.model_extra
        per_token = torch.tensor(extra["mixture"]["per_token"], dtype=torch.float64)
        assert per_token.shape == (TOKENS, 3)
        expected = offline_weights(offline_router, extra["prompt_token_ids"], extra["token_ids"])
        torch.testing.assert_close(per_token, expected, atol=1e-4, rtol=0)


def test_a_gate_reload_reaches_every_replica(routed_server, routed_client, demo_paths, tmp_path):
    url = routed_server.base_url
    experts = [read_expert(path, name) for name, path in demo_paths.expert_dirs.items()]
    constant = save_router(parse_gate_spec(",".join(map(str, CONSTANT)), experts), tmp_path / "constant")
    wait_until_idle(url, 30)
    response = post_gate(url, tmp_path / "constant", ADMIN)
    assert response.status_code == 200, response.text
    try:
        before = _finished_per_engine(url)
        choices = _completions(routed_client)
        _served_by_both(url, before)
    finally:
        restored = post_gate(url, routed_server.model_dir / GATE_SUBDIR, ADMIN)
        assert restored.status_code == 200, restored.text
    for choice in choices:
        report = choice.model_extra["mixture"]
        assert report["gate_version"] == constant.version
        torch.testing.assert_close(torch.tensor(report["per_token"]), torch.tensor([CONSTANT] * TOKENS),
                                   atol=1e-5, rtol=0)
