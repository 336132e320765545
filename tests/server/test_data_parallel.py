"""``--data-parallel-size 2``: two engine replicas behind one server, each request on one of them.

Per-request state lives in the worker that decodes the request (its gate
settings, its posterior state), so it needs nothing shared; what spans the
replicas is the gate trace (every replica's workers push to the server's one
socket) and a gate reload (vLLM sends a ``collective_rpc`` to every engine).
The composite is the routed one (``conftest.routed_composite``: a random router
whose weights move with every token), so a trace record crossed between two
requests on two replicas would show. Two slots a replica and no queue: the
server admits four requests at once, the slots of both replicas.
"""

from __future__ import annotations

import concurrent.futures

import httpx
import openai
import pytest
import torch
from server_harness import ENSEMBLE, serving, wait_until_idle
from test_routed_mixture_report import offline_weights

from gatemix.distill.teacher import EnsembleTeacher
from gatemix.engine.composite_folder import GATE_SUBDIR
from gatemix.engine.pack import parse_gate_spec
from gatemix.expert_folder import read_expert
from gatemix.gate.artifact import save_router

ADMIN = {"Authorization": "Bearer data-parallel-admin"}
SLOTS_PER_REPLICA = 2
REQUESTS = 2 * SLOTS_PER_REPLICA  # every slot of both replicas
TOKENS = 12
CONSTANT = [0.6, 0.3, 0.1]


@pytest.fixture(scope="module")
def dp_server(routed_composite, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("gatemix-serve-dp")
    with serving(routed_composite, log_dir, "--data-parallel-size", "2", "--max-num-seqs", str(SLOTS_PER_REPLICA),
                 "--max-queued-requests", "0", "--admin-key", ADMIN["Authorization"].split()[1]) as process:
        yield process.url


@pytest.fixture(scope="module")
def dp_client(dp_server):
    return openai.OpenAI(base_url=f"{dp_server}/v1", api_key="none", max_retries=0, timeout=120)


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


@pytest.mark.slow
def test_requests_on_both_replicas_get_their_own_exact_weights(dp_server, dp_client, routed_composite, demo_paths):
    before = _finished_per_engine(dp_server)
    choices = _completions(dp_client)
    _served_by_both(dp_server, before)
    offline_router = EnsembleTeacher.load(routed_composite, list(demo_paths.expert_dirs.values()))
    for choice in choices:
        extra = choice.model_extra
        per_token = torch.tensor(extra["mixture"]["per_token"], dtype=torch.float64)
        assert per_token.shape == (TOKENS, 3)
        expected = offline_weights(offline_router, extra["prompt_token_ids"], extra["token_ids"])
        torch.testing.assert_close(per_token, expected, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_the_server_admits_as_many_requests_as_both_replicas_run(dp_server):
    """One streamed request of ``n=4`` holds every slot of both replicas; the next is refused with 429."""
    long = {"model": ENSEMBLE, "prompt": "abc", "max_tokens": 200, "ignore_eos": True, "stream": True, "n": REQUESTS}
    with httpx.Client(base_url=dp_server, timeout=60) as http:
        wait_until_idle(dp_server, 30)
        with http.stream("POST", "/v1/completions", json=long) as stream:
            lines = stream.iter_lines()  # kept: a dropped line iterator closes the stream
            assert next(lines).startswith('data: {"id"'), "four choices fit in two replicas' slots"
            refused = http.post("/v1/completions", json={**long, "n": 1, "stream": False})
            assert refused.status_code == 429, refused.text
        wait_until_idle(dp_server, 30)


@pytest.mark.slow
def test_a_gate_reload_reaches_every_replica(dp_server, dp_client, routed_composite, demo_paths, tmp_path):
    experts = [read_expert(path, name) for name, path in demo_paths.expert_dirs.items()]
    constant = save_router(parse_gate_spec(",".join(map(str, CONSTANT)), experts), tmp_path / "constant")
    response = httpx.post(f"{dp_server}/admin/gate", json={"path": str(tmp_path / "constant")}, headers=ADMIN,
                          timeout=120)
    assert response.status_code == 200, response.text
    try:
        before = _finished_per_engine(dp_server)
        choices = _completions(dp_client)
        _served_by_both(dp_server, before)
    finally:
        restored = httpx.post(f"{dp_server}/admin/gate", json={"path": str(routed_composite / GATE_SUBDIR)},
                              headers=ADMIN, timeout=120)
        assert restored.status_code == 200, restored.text
    for choice in choices:
        report = choice.model_extra["mixture"]
        assert report["gate_version"] == constant.version
        torch.testing.assert_close(torch.tensor(report["per_token"]), torch.tensor([CONSTANT] * TOKENS),
                                   atol=1e-5, rtol=0)
