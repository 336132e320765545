"""Bad input gets a 4xx with an OpenAI error body, never a 500, and the server keeps serving."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

pytestmark = pytest.mark.slow

GOOD = {"prompt": "hello", "max_tokens": 2}
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}

# (id, endpoint, body: dict or raw bytes, status, param)
CASES = [
    ("invalid-json", "completions", b'{"prompt": "a", ', 400, None),
    ("not-an-object", "completions", b"[1, 2]", 400, None),
    ("prompt-wrong-type", "completions", {"prompt": 5}, 400, "prompt"),
    ("max-tokens-wrong-type", "completions", {**GOOD, "max_tokens": "many"}, 400, "max_tokens"),
    ("max-tokens-negative", "completions", {**GOOD, "max_tokens": -1}, 400, "max_tokens"),
    ("max-tokens-absurd", "completions", {**GOOD, "max_tokens": 10**12}, 400, "max_tokens"),
    (
        "chat-max-tokens-absurd",
        "chat/completions",
        {**CHAT, "max_completion_tokens": 10**9},
        400,
        "max_completion_tokens",
    ),
    ("prompt-too-long", "completions", {"prompt": "word " * 600, "max_tokens": 1}, 400, "prompt"),
    ("token-prompt-too-long", "completions", {"prompt": [5] * 300, "max_tokens": 1}, 400, "prompt"),
    (
        "chat-too-long",
        "chat/completions",
        {"messages": [{"role": "user", "content": "word " * 600}]},
        400,
        "messages",
    ),
    ("token-id-out-of-vocab", "completions", {"prompt": [1, 2, 10**9]}, 400, "prompt"),
    ("empty-token-prompt", "completions", {"prompt": []}, 400, "prompt"),
    ("unknown-model", "completions", {**GOOD, "model": "no-such-model"}, 404, "model"),
    ("chat-unknown-model", "chat/completions", {**CHAT, "model": "no-such-model"}, 404, "model"),
    (
        "weights-sum-zero",
        "completions",
        {**GOOD, "mixture": {"weights": {}}},
        400,
        "mixture.weights",
    ),
    (
        "weights-negative",
        "completions",
        {**GOOD, "mixture": {"weights": {"@0": -1.0}}},
        400,
        "mixture.weights",
    ),
    (
        "weights-unknown-expert",
        "completions",
        {**GOOD, "mixture": {"weights": {"nobody": 1.0}}},
        400,
        "mixture.weights",
    ),
    (
        "experts-unknown",
        "completions",
        {**GOOD, "mixture": {"experts": ["nobody"]}},
        400,
        "mixture.experts",
    ),
    ("experts-empty", "completions", {**GOOD, "mixture": {"experts": []}}, 400, "mixture.experts"),
    (
        "mixture-unknown-field",
        "completions",
        {**GOOD, "mixture": {"wieghts": {}}},
        400,
        "mixture.wieghts",
    ),
    ("too-many-stops", "completions", {**GOOD, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("n-above-limit", "completions", {**GOOD, "n": 5}, 400, "n"),  # the server runs with --max-n 4
    ("n-absurd", "completions", {**GOOD, "n": 10**6}, 400, "n"),
    ("n-zero", "chat/completions", {**CHAT, "n": 0}, 400, "n"),
    (
        "temperature-out-of-range",
        "chat/completions",
        {**CHAT, "temperature": 7},
        400,
        "temperature",
    ),
    ("logprobs-above-limit", "completions", {**GOOD, "logprobs": 500}, 400, "logprobs"),
    ("min-tokens-above-max", "completions", {**GOOD, "min_tokens": 50}, 400, None),
    (
        "top-logprobs-without-logprobs",
        "chat/completions",
        {**CHAT, "top_logprobs": 2},
        400,
        "top_logprobs",
    ),
    ("empty-messages", "chat/completions", {"messages": []}, 400, "messages"),
    (
        "bad-role",
        "chat/completions",
        {"messages": [{"role": "robot", "content": "x"}]},
        400,
        "messages.0.role",
    ),
    ("empty-prompt", "completions", {"prompt": ""}, 400, "prompt"),
    ("empty-prompt-list", "completions", {"prompt": ["a", ""]}, 400, "prompt"),
    ("empty-stop", "completions", {**GOOD, "stop": [""]}, 400, "stop"),
    ("prompt-logprobs-stream", "completions", {**GOOD, "stream": True, "prompt_logprobs": 1}, 400,
     "prompt_logprobs"),
    ("prompt-logprobs-above-limit", "completions", {**GOOD, "prompt_logprobs": 21}, 400,
     "prompt_logprobs"),
    # Fields that would change the result and are not supported: refused, never ignored.
    ("suffix", "completions", {**GOOD, "suffix": " return a"}, 400, "suffix"),
    ("best-of-above-n", "completions", {**GOOD, "best_of": 3}, 400, "best_of"),
    ("best-of-below-n", "completions", {**GOOD, "n": 2, "best_of": 1}, 400, "best_of"),
    ("beam-search", "completions", {**GOOD, "use_beam_search": True}, 400, "use_beam_search"),
    ("functions", "chat/completions", {**CHAT, "functions": [{"name": "f"}]}, 400, "functions"),
    ("audio", "chat/completions", {**CHAT, "modalities": ["text", "audio"]}, 400, "modalities"),
    ("chat-echo", "chat/completions", {**CHAT, "echo": True}, 400, "echo"),
    ("tools-without-tool-support", "chat/completions",
     {**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    ("tool-choice-without-tools", "chat/completions", {**CHAT, "tool_choice": "required"}, 400,
     "tool_choice"),
    ("tool-message-without-tool-support", "chat/completions",
     {"messages": [{"role": "tool", "content": "42", "tool_call_id": "c1"}]}, 400,
     "messages.0.role"),
    ("response-format-unknown-type", "chat/completions",
     {**CHAT, "response_format": {"type": "structural_tag", "format": {}}}, 400,
     "response_format.type"),
    ("json-schema-without-schema", "chat/completions",
     {**CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, 400,
     "response_format"),
    ("two-constraints", "completions",
     {**GOOD, "structured_outputs": {"regex": "a+", "choice": ["a"]}}, 400, "structured_outputs"),
    ("bad-regex", "completions", {**GOOD, "structured_outputs": {"regex": "(("}}, 400,
     "structured_outputs"),
    ("bad-grammar-in-a-stream", "completions",
     {**GOOD, "stream": True, "structured_outputs": {"grammar": "root ::= ("}}, 400,
     "structured_outputs"),
    ("bad-json-schema", "chat/completions",
     {**CHAT, "response_format": {"type": "json_schema",
                                  "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     400, "response_format"),
    ("logit-bias-out-of-vocab", "completions", {**GOOD, "logit_bias": {"999999": 5}}, 400,
     "logit_bias"),
    ("logit-bias-not-a-token", "completions", {**GOOD, "logit_bias": {"abc": 5}}, 400,
     "logit_bias.abc"),
    ("logit-bias-out-of-range", "completions", {**GOOD, "logit_bias": {"5": 500}}, 400,
     "logit_bias.5"),
    ("stop-token-out-of-vocab", "completions", {**GOOD, "stop_token_ids": [10**7]}, 400,
     "stop_token_ids"),
]


def _expand(body, server):
    """Put a real expert name where a case says ``@0``."""
    if isinstance(body, dict) and "mixture" in body and "weights" in body["mixture"]:
        weights = {
            server.experts[0] if k == "@0" else k: v for k, v in body["mixture"]["weights"].items()
        }
        return {**body, "mixture": {**body["mixture"], "weights": weights}}
    return body


@pytest.mark.parametrize(
    "endpoint, body, status, param", [case[1:] for case in CASES], ids=[c[0] for c in CASES]
)
def test_bad_input_gets_an_openai_error_and_the_server_keeps_serving(
    http, server, endpoint, body, status, param
):
    body = _expand(body, server)
    if isinstance(body, bytes):
        response = http.post(
            f"/v1/{endpoint}", content=body, headers={"Content-Type": "application/json"}
        )
    else:
        response = http.post(f"/v1/{endpoint}", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param
    if status == 404:
        assert error["code"] == "model_not_found"
    good = http.post("/v1/completions", json={**GOOD, "model": server.ensemble})
    assert good.status_code == 200 and good.json()["choices"][0]["finish_reason"] in (
        "stop",
        "length",
    )


def test_the_openai_client_raises_its_own_error_types(client, server):
    with pytest.raises(openai.NotFoundError) as not_found:
        client.completions.create(model="no-such-model", prompt="x", max_tokens=1)
    assert not_found.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(
            model=server.ensemble,
            prompt="x",
            max_tokens=1,
            extra_body={"mixture": {"weights": {"nobody": 1}}},
        )


def test_unknown_route_is_an_openai_404(http):
    response = http.get("/v1/nothing-here")
    assert (
        response.status_code == 404 and response.json()["error"]["type"] == "invalid_request_error"
    )


def _disconnect_mid_stream(http_client: httpx.Client, body: dict) -> tuple[int, dict]:
    """Open a stream, read one event, hang up; returns (aborts it caused, health after)."""
    aborted_before = http_client.get("/health").json()["requests_aborted"]
    with http_client.stream("POST", "/v1/completions", json=body) as response:
        assert next(response.iter_lines()).startswith("data: ")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        health = http_client.get("/health").json()
        if health["engine_unfinished_requests"] == 0 and health["requests_running"] == 0:
            break
        time.sleep(0.05)
    return health["requests_aborted"] - aborted_before, health


def test_client_disconnect_aborts_its_engine_requests(server):
    """Closing a stream mid-way aborts every choice in the engine; no slot is left running.

    The tiny model writes 240 tokens in well under a second, so on a busy machine the
    client may be descheduled long enough for the choices to finish before it hangs up;
    then nothing is left to abort and the attempt is repeated. Leaks are checked on every try.
    """
    headers = {"Authorization": f"Bearer {server.api_keys[0]}"}
    body = {
        "model": server.ensemble,
        "prompt": "abc",
        "max_tokens": 240,
        "n": server.max_n,
        "stream": True,
        "ignore_eos": True,
    }
    with httpx.Client(base_url=server.base_url, headers=headers, timeout=60) as http_client:
        for _attempt in range(5):
            aborted, health = _disconnect_mid_stream(http_client, body)
            assert health["engine_unfinished_requests"] == 0
            assert health["requests_running"] == 0 and health["requests_waiting"] == 0
            if aborted == server.max_n:
                break
        assert aborted == server.max_n
        follow_up = http_client.post("/v1/completions", json={**GOOD, "model": server.ensemble})
        assert follow_up.status_code == 200


def test_no_server_error_was_counted(http):
    metrics = http.get("/metrics").text
    assert 'gatemix_request_errors_total{code="500"} 0.0' in metrics
