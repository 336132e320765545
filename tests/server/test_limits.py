"""Backpressure and limits, each followed by a good request that is served.

* the body limit, before parsing: a declared or a chunked body over it is a 413;
* the output budget: prompts x n x max_tokens over it is a 400;
* the queue depth: past the engine's slots and the queue, a 429 with Retry-After.

The request timeout (504) is in ``test_lifecycle.py``, on a server of its own.
"""

from __future__ import annotations

import time

import httpx
import openai
import pytest
from conftest import (
    ENSEMBLE,
    ROUTED_MAX_NUM_SEQS,
    ROUTED_MAX_OUTPUT_TOKENS,
    ROUTED_MAX_QUEUED,
    ROUTED_REPLICAS,
)
from server_harness import wait_until_idle

pytestmark = pytest.mark.slow

BODY_LIMIT = 8 * 1024 * 1024  # the default max_body_bytes


def _assert_error(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code
    return error


def _good(client, model) -> None:
    response = client.completions.create(model=model, prompt="hello", max_tokens=2)
    assert response.choices[0].finish_reason in ("stop", "length")


def test_a_body_over_the_limit_is_refused_before_it_is_parsed(routed_server, routed_client):
    # 20 MB of valid JSON: parsing and tokenizing it would take seconds; the refusal does not.
    body = b'{"prompt": "' + b"word " * (4 * 1024 * 1024) + b'", "max_tokens": 1}'
    json_type = {"Content-Type": "application/json"}

    def chunks():  # no Content-Length: refused as soon as the bytes read pass the limit
        for _ in range(BODY_LIMIT // (1 << 20) + 4):
            yield b" " * (1 << 20)

    with httpx.Client(base_url=routed_server.base_url, timeout=120) as http:
        started = time.monotonic()
        _assert_error(http.post("/v1/completions", content=body, headers=json_type), 413, "request_too_large")
        assert time.monotonic() - started < 5
        chunked = http.post("/v1/chat/completions", content=chunks(), headers=json_type)
        _assert_error(chunked, 413, "request_too_large")
        _good(routed_client, ENSEMBLE)
        # Just under the limit is parsed as usual (and refused for what it is, not for its size).
        under = http.post("/v1/completions", content=b" " * (BODY_LIMIT - 100) + b"{}", headers=json_type)
        assert under.status_code == 400 and under.json()["error"]["param"] == "prompt"


def test_the_output_budget_caps_n_times_max_tokens(routed_client):
    per_choice = ROUTED_MAX_OUTPUT_TOKENS // 4 + 1
    with pytest.raises(openai.BadRequestError) as error:
        routed_client.completions.create(
            model=ENSEMBLE, prompt="a", n=4, max_tokens=per_choice
        )
    assert error.value.body["param"] == "max_tokens" and str(ROUTED_MAX_OUTPUT_TOKENS) in str(
        error.value.body["message"]
    )
    with pytest.raises(openai.BadRequestError):  # two prompts count twice
        routed_client.completions.create(
            model=ENSEMBLE, prompt=["a", "b"], n=2, max_tokens=per_choice
        )
    # Without max_tokens each choice gets its share of the budget, not a refusal.
    response = routed_client.completions.create(
        model=ENSEMBLE, prompt="a", n=4, max_tokens=None, extra_body={"ignore_eos": True}
    )
    assert response.usage.completion_tokens <= ROUTED_MAX_OUTPUT_TOKENS
    _good(routed_client, ENSEMBLE)


def test_past_the_queue_depth_requests_get_429_with_retry_after(routed_server, routed_client):
    """The server admits the slots of both replicas and its queue, no more: one streamed request
    of that many choices is admitted, the next is refused."""
    capacity = ROUTED_MAX_NUM_SEQS * ROUTED_REPLICAS + ROUTED_MAX_QUEUED
    url = routed_server.base_url
    long = {"model": ENSEMBLE, "prompt": "abc", "max_tokens": ROUTED_MAX_OUTPUT_TOKENS // capacity,
            "ignore_eos": True, "stream": True, "n": capacity}
    with httpx.Client(base_url=url, timeout=60) as http:
        wait_until_idle(url, 30)
        with http.stream("POST", "/v1/completions", json=long) as stream:
            lines = stream.iter_lines()  # kept: a dropped line iterator closes the stream
            assert next(lines).startswith('data: {"id"')  # all its choices admitted, running
            refused = http.post("/v1/completions", json={**long, "n": 1, "stream": False})
            error = _assert_error(refused, 429, "server_overloaded")
            assert error["type"] == "rate_limit_error"
            assert int(refused.headers["Retry-After"]) >= 0
            with pytest.raises(openai.RateLimitError):
                routed_client.chat.completions.create(
                    model=ENSEMBLE, messages=[{"role": "user", "content": "hi"}], max_tokens=1
                )
            # Tokenizing is not generating: it is never queued.
            assert http.post("/tokenize", json={"prompt": "abc"}).status_code == 200
        health = wait_until_idle(url, 30)  # hanging up released every admitted choice
        assert health["requests_running"] == 0 and health["requests_waiting"] == 0
    _good(routed_client, ENSEMBLE)
