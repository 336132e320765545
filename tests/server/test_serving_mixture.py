"""The ``mixture`` extension and each choice's lifecycle, against the fake engine.

What the server passes on to the engine for a request's gate (pins, an expert
subset, the gate version, a trace), the per-token weights it joins back to the
tokens, and the bookkeeping around each engine request: traces released,
queue counts back to zero, unfinished requests aborted at the deadline.
"""

from __future__ import annotations

import pytest
from fake_engine import (
    BASE_WEIGHTS,
    ENSEMBLE,
    EXPERTS,
    GATE_VERSION,
    SCRIPT,
    gate_weights,
    serving_app,
    stream_chunks,
)
from fastapi.testclient import TestClient

from gatemix.engine.request_gates import GATE_ARGS_KEY

PROMPT = "Say hi"


def assert_rows_close(rows: list[list[float]], expected: list[list[float]]) -> None:
    """(tokens, K) weights equal row by row (pytest.approx takes no nesting)."""
    assert len(rows) == len(expected)
    for row, want in zip(rows, expected):
        assert row == pytest.approx(want)


def only_gate_args(stack) -> dict:
    (params,) = stack.engine.params.values()
    return params.extra_args[GATE_ARGS_KEY]


def complete(api, **fields) -> dict:
    response = api.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4, **fields})
    assert response.status_code == 200, response.text
    return response.json()


def test_the_gate_decides_by_default_and_reports_its_weights(stack, api):
    body = complete(api, mixture={"per_token": True})
    gate_args = only_gate_args(stack)
    assert "weights" not in gate_args and "experts_mask" not in gate_args
    assert (
        gate_args["gate_version"] == GATE_VERSION
        and gate_args["trace_to"] == stack.receiver.address
    )
    mixture = body["choices"][0]["mixture"]
    expected = [gate_weights({}, i) for i in range(4)]
    assert_rows_close(mixture["per_token"], expected)
    assert mixture["experts"] == EXPERTS and mixture["gate_version"] == GATE_VERSION
    means = {name: sum(row[k] for row in expected) / 4 for k, name in enumerate(EXPERTS)}
    assert mixture["mean_weights"] == pytest.approx(means)
    assert body["mixture"] == mixture  # the response repeats choice 0's


def test_per_token_is_left_out_unless_asked(api):
    mixture = complete(api)["choices"][0]["mixture"]
    assert "per_token" not in mixture and set(mixture["mean_weights"]) == set(EXPERTS)


def test_pinned_weights_go_to_the_engine_normalized_in_expert_order(stack, api):
    body = complete(api, mixture={"weights": {"tech": 3.0, "code": 1.0}, "per_token": True})
    assert only_gate_args(stack)["weights"] == pytest.approx([0.25, 0.0, 0.75])
    assert_rows_close(body["choices"][0]["mixture"]["per_token"], [[0.25, 0.0, 0.75]] * 4)


def test_expert_subset_becomes_a_mask(stack, api):
    body = complete(api, mixture={"experts": ["code", "tech"], "per_token": True})
    assert only_gate_args(stack)["experts_mask"] == [True, False, True]
    assert all(row[1] == 0.0 for row in body["choices"][0]["mixture"]["per_token"])


def test_an_expert_name_pins_a_one_hot_gate(stack, api):
    body = complete(api, model="legal")
    assert only_gate_args(stack)["weights"] == [0.0, 1.0, 0.0]
    assert body["model"] == "legal"
    assert body["choices"][0]["mixture"]["mean_weights"] == pytest.approx(
        {"code": 0, "legal": 1, "tech": 0}
    )


@pytest.mark.parametrize(
    "mixture, param",
    [
        ({"weights": {"law": 1.0}}, "mixture.weights"),
        ({"weights": {"code": 0.0}}, "mixture.weights"),
        ({"experts": []}, "mixture.experts"),
        ({"weights": {"code": 1.0}, "experts": ["tech"]}, "mixture"),
    ],
)
def test_bad_mixture_is_a_400_before_any_engine_work(stack, api, mixture, param):
    response = api.post("/v1/completions", json={"prompt": PROMPT, "mixture": mixture})
    assert response.status_code == 400 and response.json()["error"]["param"] == param
    assert stack.engine.params == {}


def test_stream_chunks_carry_their_own_tokens_weights(api):
    request = {"prompt": PROMPT, "max_tokens": 3, "stream": True, "mixture": {"per_token": True}}
    chunks = stream_chunks(api.post("/v1/completions", json=request))
    per_token = [row for chunk in chunks for row in chunk["choices"][0]["mixture"]["per_token"]]
    assert_rows_close(per_token, [gate_weights({}, i) for i in range(3)])
    # The running mean: the last chunk's equals the whole choice's.
    last_mean = chunks[-1]["choices"][0]["mixture"]["mean_weights"]
    assert last_mean == pytest.approx(
        {name: sum(gate_weights({}, i)[k] for i in range(3)) / 3 for k, name in enumerate(EXPERTS)}
    )


def test_each_choice_has_its_own_trace_and_all_are_released(stack, api):
    complete(api, n=3)
    trace_ids = {
        params.extra_args[GATE_ARGS_KEY]["trace_id"] for params in stack.engine.params.values()
    }
    assert len(trace_ids) == 3
    assert stack.receiver.traces == {}
    assert stack.core.gate.gate_versions_in_flight() == []
    health = api.get("/health").json()
    assert (health["requests_waiting"], health["requests_running"], health["requests_aborted"]) == (
        0,
        0,
        0,
    )
    assert health["requests_admitted"] == 0


def test_missing_weights_make_the_mean_unknown(stack, api):
    stack.receiver.record = lambda *args: None  # the workers' weights never arrive
    mixture = complete(api, mixture={"per_token": True})["choices"][0]["mixture"]
    assert mixture["mean_weights"] == {} and mixture.get("per_token") is None


def test_finished_choices_and_errors_are_recorded_in_the_metrics(stack, api):
    complete(api, n=2)
    api.post("/v1/completions", json={"prompt": PROMPT, "n": 9})  # a 400
    samples = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in api.get("/metrics").text.splitlines()
        if line and not line.startswith("#")
    }
    assert samples[f'gatemix_requests_total{{model="{ENSEMBLE}"}}'] == 2
    assert samples[f'gatemix_generation_tokens_total{{model="{ENSEMBLE}"}}'] == 2 * 4
    assert samples[f'gatemix_prompt_tokens_total{{model="{ENSEMBLE}"}}'] == 2 * len(PROMPT)
    assert samples['gatemix_request_errors_total{code="400"}'] == 1
    assert samples["gatemix_requests_running"] == 0 and samples["gatemix_requests_waiting"] == 0


def test_past_the_deadline_the_engine_requests_are_aborted_with_a_504():
    stack = serving_app(step_delay_s=0.05, request_timeout_s=0.1)
    with TestClient(stack.app) as api:
        response = api.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 50, "n": 2})
    assert response.status_code == 504 and response.json()["error"]["code"] == "timeout"
    assert sorted(stack.engine.aborted) == sorted(stack.engine.params)
    assert stack.core.recorder.aborted == 2 and stack.receiver.traces == {}


def test_a_stream_past_its_deadline_ends_with_an_error_event_then_done():
    stack = serving_app(step_delay_s=0.05, request_timeout_s=0.12)
    with TestClient(stack.app) as api:
        response = api.post(
            "/v1/completions", json={"prompt": PROMPT, "max_tokens": 50, "stream": True}
        )
    chunks = stream_chunks(response)
    assert response.status_code == 200 and chunks[-1]["error"]["code"] == "timeout"
    text = "".join(chunk["choices"][0]["text"] for chunk in chunks[:-1])
    assert SCRIPT.startswith(text) and len(text) < 50
    assert stack.engine.aborted == list(stack.engine.params)


def test_base_weights_rotate_so_tokens_differ():
    # The fake's own invariant, which the per-token tests above rely on.
    assert gate_weights({}, 0) == BASE_WEIGHTS and gate_weights({}, 1) != BASE_WEIGHTS
