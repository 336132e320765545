"""The serving logic against a fake engine (``fake_engine.py``): no vLLM engine, no demo.

Completions and chat, streaming (SSE framing, ``[DONE]``), ``n > 1``,
logprobs, stop handling and finish reasons, usage, and the 400s for refused
fields, through the real routes, handlers and error mapping. The fake says
``SCRIPT`` to every prompt, one character (one token) a step.
"""

from __future__ import annotations

import pytest
from fake_engine import SCRIPT, stream_chunks

PROMPT = "Say hi"


def test_completion_text_usage_and_length_finish(stack, api):
    body = api.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 5}).json()
    (choice,) = body["choices"]
    assert choice["text"] == SCRIPT[:5] and choice["finish_reason"] == "length"
    (produced,) = stack.engine.produced.values()
    assert body["usage"] == {
        "prompt_tokens": len(PROMPT),
        "completion_tokens": len(produced),
        "total_tokens": len(PROMPT) + len(produced),
    }
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")


def test_completion_to_eos_finishes_with_stop(api):
    choice = api.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 100}).json()[
        "choices"
    ][0]
    assert choice["text"] == SCRIPT and choice["finish_reason"] == "stop"


def test_stop_string_cuts_the_text_and_counts_its_tokens(stack, api):
    body = api.post(
        "/v1/completions", json={"prompt": PROMPT, "max_tokens": 50, "stop": ["."]}
    ).json()
    assert body["choices"][0]["text"] == "Hello there"
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == len(
        "Hello there."
    )  # the stop's token was generated
    (params,) = stack.engine.params.values()
    assert params.stop == ["."]


def test_include_stop_str_in_output_keeps_the_stop(api):
    request = {
        "prompt": PROMPT,
        "max_tokens": 50,
        "stop": "there",
        "include_stop_str_in_output": True,
    }
    assert api.post("/v1/completions", json=request).json()["choices"][0]["text"] == "Hello there"


def test_n_choices_are_separate_engine_requests_with_seeds(stack, api):
    request = {"prompt": [PROMPT, "Yo"], "max_tokens": 4, "n": 2, "seed": 7}
    body = api.post("/v1/completions", json=request).json()
    assert [choice["index"] for choice in body["choices"]] == [0, 1, 2, 3]
    assert all(choice["text"] == SCRIPT[:4] for choice in body["choices"])
    seeds = sorted(params.seed for params in stack.engine.params.values())
    assert seeds == [7, 7, 8, 8] and len(stack.engine.params) == 4
    # Each prompt counts once, whatever n; every choice's tokens count.
    assert body["usage"]["prompt_tokens"] == len(PROMPT) + len("Yo")
    assert body["usage"]["completion_tokens"] == 4 * 4


def test_echo_prepends_the_prompt_of_each_choice(api):
    body = api.post(
        "/v1/completions", json={"prompt": ["ab", "cd"], "max_tokens": 2, "echo": True}
    ).json()
    assert [choice["text"] for choice in body["choices"]] == ["ab" + SCRIPT[:2], "cd" + SCRIPT[:2]]


def test_max_tokens_zero_with_echo_scores_the_prompt_only(stack, api):
    request = {"prompt": PROMPT, "max_tokens": 0, "echo": True, "logprobs": 1}
    body = api.post("/v1/completions", json=request).json()
    choice = body["choices"][0]
    assert choice["text"] == PROMPT and body["usage"]["completion_tokens"] == 0
    assert choice["logprobs"]["tokens"] == list(PROMPT)
    assert choice["logprobs"]["token_logprobs"][0] is None  # the first prompt token has none
    (params,) = stack.engine.params.values()
    assert params.max_tokens == 1 and params.prompt_logprobs == 1


def test_completion_logprobs_have_the_top_k(stack, api):
    body = api.post(
        "/v1/completions", json={"prompt": PROMPT, "max_tokens": 3, "logprobs": 2}
    ).json()
    logprobs = body["choices"][0]["logprobs"]
    assert logprobs["tokens"] == list(SCRIPT[:3])
    assert logprobs["token_logprobs"] == pytest.approx([-0.1] * 3)
    assert all(len(top) == 2 for top in logprobs["top_logprobs"])
    assert logprobs["text_offset"] == [0, 1, 2]
    (params,) = stack.engine.params.values()
    assert params.logprobs == 2


def test_completion_logprobs_name_tokens_by_id_when_asked(stack, api):
    """vLLM's return_tokens_as_token_ids: every token and top-logprob key is ``token_id:<id>``."""
    body = api.post("/v1/completions", json={
        "prompt": PROMPT, "max_tokens": 3, "logprobs": 2, "return_tokens_as_token_ids": True,
        "return_token_ids": True}).json()
    choice = body["choices"][0]
    assert choice["logprobs"]["tokens"] == [f"token_id:{token}" for token in choice["token_ids"]]
    assert all(all(key.startswith("token_id:") for key in top) and len(top) == 2
               for top in choice["logprobs"]["top_logprobs"])
    refused = api.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "Hi"}], "logprobs": True, "return_tokens_as_token_ids": True})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "return_tokens_as_token_ids"


def test_completion_stream_frames_chunks_then_done(api):
    request = {
        "prompt": PROMPT,
        "max_tokens": 6,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    chunks = stream_chunks(api.post("/v1/completions", json=request))
    *token_chunks, usage_chunk = chunks
    assert "".join(chunk["choices"][0]["text"] for chunk in token_chunks) == SCRIPT[:6]
    assert [chunk["choices"][0]["finish_reason"] for chunk in token_chunks][-1] == "length"
    assert all(chunk["choices"][0]["finish_reason"] is None for chunk in token_chunks[:-1])
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 6
    assert len({chunk["id"] for chunk in chunks}) == 1


def test_stream_without_include_usage_reports_none(api):
    chunks = stream_chunks(
        api.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, "stream": True})
    )
    assert all(chunk.get("usage") is None for chunk in chunks)


def test_return_token_ids_gives_prompt_and_output_ids(api):
    request = {"prompt": "ab", "max_tokens": 3, "return_token_ids": True}
    choice = api.post("/v1/completions", json=request).json()["choices"][0]
    assert choice["prompt_token_ids"] == [ord("a"), ord("b")]
    assert choice["token_ids"] == [ord(char) for char in SCRIPT[:3]]


def test_chat_completion_renders_the_template(stack, api):
    messages = [{"role": "user", "content": "Hello"}]
    body = api.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 5}).json()
    choice = body["choices"][0]
    assert choice["message"] == {"content": SCRIPT[:5], "role": "assistant", "tool_calls": []}
    assert choice["finish_reason"] == "length"
    rendered = "<|user|>\nHello\n<|assistant|>\n"  # gatemix's fallback template
    assert body["usage"]["prompt_tokens"] == len(rendered)
    (request_id,) = stack.engine.params  # one engine request, with gatemix's id
    assert request_id.startswith("gatemix-")


def test_chat_max_completion_tokens_wins_over_max_tokens(api):
    request = {
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 9,
        "max_completion_tokens": 2,
    }
    assert (
        api.post("/v1/chat/completions", json=request).json()["choices"][0]["message"]["content"]
        == SCRIPT[:2]
    )


def test_chat_logprobs_list_top_logprobs(api):
    request = {
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 2,
        "logprobs": True,
        "top_logprobs": 3,
    }
    content = api.post("/v1/chat/completions", json=request).json()["choices"][0]["logprobs"][
        "content"
    ]
    assert [entry["token"] for entry in content] == list(SCRIPT[:2])
    assert all(len(entry["top_logprobs"]) == 3 for entry in content)


def test_chat_stream_opens_each_choice_with_the_role(api):
    request = {
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 3,
        "n": 2,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    chunks = stream_chunks(api.post("/v1/chat/completions", json=request))
    openings = chunks[:2]
    assert [c["choices"][0]["delta"] for c in openings] == [
        {"content": "", "role": "assistant"}
    ] * 2
    assert {c["choices"][0]["index"] for c in openings} == {0, 1}
    texts = {0: "", 1: ""}
    for chunk in chunks[2:-1]:
        (choice,) = chunk["choices"]
        texts[choice["index"]] += choice["delta"]["content"]
    assert texts == {0: SCRIPT[:3], 1: SCRIPT[:3]}
    assert (
        chunks[-1]["usage"]["completion_tokens"] == 6
        and chunks[-1]["object"] == "chat.completion.chunk"
    )


@pytest.mark.parametrize(
    "path, field, value",
    [
        ("/v1/completions", "use_beam_search", True),
        ("/v1/completions", "suffix", "tail"),
        ("/v1/completions", "best_of", 3),
        ("/v1/completions", "logits_processors", ["x"]),
        ("/v1/chat/completions", "echo", True),
        ("/v1/chat/completions", "chat_template", "{{ messages }}"),
        ("/v1/chat/completions", "reasoning_effort", "high"),
    ],
)
def test_refused_field_is_a_400_naming_it(stack, api, path, field, value):
    request = {"max_tokens": 2, field: value}
    request |= (
        {"prompt": PROMPT}
        if path == "/v1/completions"
        else {"messages": [{"role": "user", "content": "x"}]}
    )
    response = api.post(path, json=request)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == field and error["code"] == "unsupported_parameter"
    assert error["type"] == "invalid_request_error" and f"`{field}`" in error["message"]
    assert stack.engine.params == {}  # refused before any engine work


@pytest.mark.parametrize(
    "change, param",
    [
        ({"n": 5}, "n"),  # the fake server allows 4
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"logprobs": 21}, "logprobs"),
        ({"prompt": [1, 2, 300]}, "prompt"),  # past the vocabulary
        ({"logit_bias": {"500": 1.0}}, "logit_bias"),
        ({"max_tokens": 1000}, "max_tokens"),  # past the context
        ({"prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
        ({"min_tokens": 5, "max_tokens": 2}, None),  # vLLM's own check on the choice's params
    ],
)
def test_limits_are_400s_naming_the_field(stack, api, change, param):
    response = api.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, **change})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    assert stack.engine.params == {}


def test_context_overflow_says_context_length_exceeded(api):
    error = api.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 1000}).json()["error"]
    assert (
        error["code"] == "context_length_exceeded"
        and "maximum context length is 256" in error["message"]
    )


def test_unknown_model_is_a_404(api):
    response = api.post("/v1/completions", json={"model": "nope", "prompt": PROMPT})
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"


def test_a_model_is_retrieved_by_name_and_an_unknown_one_is_an_openai_404(api):
    """OpenAI's ``GET /v1/models/{model}``; a name with a slash arrives percent-encoded."""
    listed = api.get("/v1/models").json()["data"]
    for card in listed:
        assert {**api.get(f"/v1/models/{card['id']}").json(), "created": 0} == {**card, "created": 0}
    assert [card["id"] for card in api.get("/v1/models/").json()["data"]] == [c["id"] for c in listed]
    response = api.get("/v1/models/org%2Fnope")
    assert response.status_code == 404
    assert response.json()["error"] == {
        "message": "The model `org/nope` does not exist or you do not have access to it.",
        "type": "invalid_request_error", "param": "model", "code": "model_not_found",
    }
