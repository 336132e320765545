"""``/v1/responses`` against the fake engine: shapes, events, the store, refusals.

A response is served by the chat path, so each test checks it against the chat
request it means on the same fake stack (the same prompt tokens, the same
text), and the ``openai`` client parses what it gets (through the fake
stack's test client). The fake says ``SCRIPT`` to every prompt, one character
(one token) a step; its chat template has no tools.
"""

from __future__ import annotations

import json

import openai
import pytest
from fake_engine import EXPERTS, MAX_MODEL_LEN, SCRIPT, gate_weights, serving_app
from fastapi.testclient import TestClient

from gatemix.engine.request_gates import GATE_ARGS_KEY

INPUT = "Say hi"
LOGPROBS = "message.output_text.logprobs"


def respond(api, **fields) -> dict:
    response = api.post("/v1/responses", json={"input": INPUT, **fields})
    assert response.status_code == 200, response.text
    return response.json()


def chat(api, messages: list[dict], **fields) -> dict:
    response = api.post("/v1/chat/completions", json={"messages": messages, **fields})
    assert response.status_code == 200, response.text
    return response.json()


def output_text(body: dict) -> str:
    return "".join(
        part["text"] for item in body["output"] if item["type"] == "message"
        for part in item["content"]
    )


def events(response) -> list[dict]:
    """Each server-sent event's data, checked against its ``event:`` name; no [DONE]."""
    assert response.headers["content-type"].startswith("text/event-stream")
    blocks = response.text.split("\n\n")
    assert blocks[-1] == ""
    result = []
    for block in blocks[:-1]:
        name, data = block.split("\n")
        assert name.startswith("event: ") and data.startswith("data: ")
        event = json.loads(data[len("data: "):])
        assert event["type"] == name[len("event: "):]
        result.append(event)
    return result


def only_params(stack):
    (params,) = stack.engine.params.values()
    return params


# ---------------------------------------------------------------- shapes


def test_a_string_input_is_the_chat_user_message_with_its_text_and_usage(api):
    body = respond(api, max_output_tokens=5)
    expected = chat(api, [{"role": "user", "content": INPUT}], max_completion_tokens=5)
    assert body["object"] == "response" and body["id"].startswith("resp_")
    assert body["status"] == "incomplete"
    assert body["incomplete_details"] == {"reason": "max_output_tokens"}
    (item,) = body["output"]
    assert item["type"] == "message" and item["role"] == "assistant" and item["id"].startswith("msg_")
    assert item["content"] == [
        {"type": "output_text", "text": SCRIPT[:5], "annotations": [], "logprobs": []}
    ]
    usage, chat_usage = body["usage"], expected["usage"]
    assert (usage["input_tokens"], usage["output_tokens"], usage["total_tokens"]) == (
        chat_usage["prompt_tokens"], chat_usage["completion_tokens"], chat_usage["total_tokens"]
    )
    assert usage["output_tokens"] == 5 and body["model"] == expected["model"]


def test_a_response_to_the_end_is_completed_and_echoes_the_request(api):
    body = respond(api, temperature=0.5, top_p=0.9, metadata={"k": "v"}, user="u1")
    assert body["status"] == "completed" and body["incomplete_details"] is None
    assert output_text(body) == SCRIPT and body["output"][0]["status"] == "completed"
    assert (body["temperature"], body["top_p"], body["metadata"], body["user"]) == (
        0.5, 0.9, {"k": "v"}, "u1"
    )
    assert body["tools"] == [] and body["tool_choice"] == "auto" and body["error"] is None
    assert body["text"] == {"format": {"type": "text"}} and body["truncation"] == "disabled"


def test_instructions_and_message_items_render_as_the_chat_conversation(api):
    items = [
        {"type": "message", "role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "input_text", "text": "Hi "},
                                     {"type": "input_text", "text": "there"}]},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Hello."}]},
        {"role": "user", "content": "Again"},
    ]
    body = respond(api, input=items, instructions="You are terse.", max_output_tokens=3)
    expected = chat(api, [
        {"role": "system", "content": "You are terse."}, {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Again"},
    ], max_completion_tokens=3)
    assert body["usage"]["input_tokens"] == expected["usage"]["prompt_tokens"]
    assert body["instructions"] == "You are terse."


def test_sampling_fields_reach_the_engine_as_chat_sends_them(stack, api):
    body = respond(api, temperature=0.5, top_p=0.5, seed=7, stop=["there"], top_k=3)
    params = only_params(stack)
    assert (params.temperature, params.top_p, params.seed, params.top_k) == (0.5, 0.5, 7, 3)
    assert output_text(body) == "Hello " and body["status"] == "completed"


@pytest.mark.parametrize(
    "text_format, structured",
    [({"type": "json_object"}, {"json_object": True}),
     ({"type": "json_schema", "name": "x", "schema": {"type": "object"}, "strict": True},
      {"json": {"type": "object"}})],
    ids=["json_object", "json_schema"],
)
def test_text_format_becomes_the_structured_output(stack, api, text_format, structured):
    body = respond(api, text={"format": text_format}, max_output_tokens=2)
    constraint = only_params(stack).structured_outputs
    assert {k: v for k, v in vars(constraint).items() if k in structured} == structured
    assert {k: v for k, v in body["text"]["format"].items() if v is not None} == text_format


def test_included_logprobs_cover_every_output_token_and_prompt_logprobs_the_input(api):
    body = respond(api, include=[LOGPROBS], top_logprobs=2, max_output_tokens=4, prompt_logprobs=1)
    logprobs = body["output"][0]["content"][0]["logprobs"]
    assert [entry["token"] for entry in logprobs] == list(SCRIPT[:4])
    assert all(len(entry["top_logprobs"]) == 2 for entry in logprobs)
    assert body["top_logprobs"] == 2
    assert len(body["prompt_logprobs"]) == body["usage"]["input_tokens"]
    assert "prompt_logprobs" not in respond(api, max_output_tokens=1)


# ---------------------------------------------------------------- mixture


def test_the_mixture_reports_the_gate_per_token(stack, api):
    body = respond(api, max_output_tokens=4, mixture={"per_token": True})
    rows = body["mixture"]["per_token"]
    for row, i in zip(rows, range(4), strict=True):
        assert row == pytest.approx(gate_weights({}, i))
    assert body["mixture"]["experts"] == EXPERTS and set(body["mixture"]["mean_weights"]) == set(EXPERTS)


def test_pins_and_subsets_go_to_the_engine_as_in_chat(stack, api):
    body = respond(api, max_output_tokens=2,
                   mixture={"weights": {"tech": 3.0, "code": 1.0}, "per_token": True})
    assert only_params(stack).extra_args[GATE_ARGS_KEY]["weights"] == pytest.approx([0.25, 0, 0.75])
    assert body["mixture"]["per_token"] == [pytest.approx([0.25, 0.0, 0.75])] * 2
    stack.engine.params.clear()
    respond(api, max_output_tokens=2, mixture={"experts": ["code", "tech"]})
    assert only_params(stack).extra_args[GATE_ARGS_KEY]["experts_mask"] == [True, False, True]


# ---------------------------------------------------------------- streaming

TEXT_EVENTS = [
    "response.created", "response.in_progress", "response.output_item.added",
    "response.content_part.added", *["response.output_text.delta"] * 6,
    "response.output_text.done", "response.content_part.done", "response.output_item.done",
    "response.incomplete",
]


def test_a_stream_sends_openais_events_in_order_and_ends_with_the_whole_response(api):
    response = api.post("/v1/responses", json={
        "input": INPUT, "stream": True, "max_output_tokens": 6, "mixture": {"per_token": True},
    })
    got = events(response)
    assert [event["type"] for event in got] == TEXT_EVENTS
    assert [event["sequence_number"] for event in got] == list(range(len(got)))
    deltas = [event for event in got if event["type"] == "response.output_text.delta"]
    assert "".join(event["delta"] for event in deltas) == SCRIPT[:6]
    assert [event["mixture"]["per_token"] for event in deltas] == [
        [pytest.approx(gate_weights({}, i))] for i in range(6)
    ]
    assert got[0]["response"]["status"] == "in_progress" and got[0]["response"]["output"] == []
    final = got[-1]["response"]
    assert output_text(final) == SCRIPT[:6] and final["usage"]["output_tokens"] == 6
    assert got[-2]["item"] == final["output"][0] and got[-4]["text"] == SCRIPT[:6]
    assert len(final["mixture"]["per_token"]) == 6
    assert api.get(f"/v1/responses/{final['id']}").json() == final


def test_a_stream_to_the_end_completes_like_the_whole_response(api):
    got = events(api.post("/v1/responses", json={"input": INPUT, "stream": True}))
    whole = respond(api)
    assert got[-1]["type"] == "response.completed"
    final = got[-1]["response"]
    assert output_text(final) == output_text(whole) == SCRIPT
    assert final["usage"] == whole["usage"] and final["status"] == whole["status"] == "completed"


def test_a_stream_past_its_deadline_ends_with_an_error_event():
    stack = serving_app(step_delay_s=0.05, request_timeout_s=0.12)
    with TestClient(stack.app) as api:
        got = events(api.post("/v1/responses", json={"input": INPUT, "stream": True}))
    assert got[-1]["type"] == "error" and got[-1]["code"] == "timeout"
    assert got[-1]["sequence_number"] == len(got) - 1
    assert stack.engine.aborted == list(stack.engine.params)


def test_the_openai_client_parses_responses_and_stream_events(api):
    from openai.types.responses import ResponseCompletedEvent, ResponseTextDeltaEvent

    client = openai.OpenAI(base_url=f"{api.base_url}/v1", api_key="none", http_client=api)
    response = client.responses.create(model="ens", input=INPUT, instructions="Be terse.")
    assert response.output_text == SCRIPT and response.usage.output_tokens == len(SCRIPT)
    assert response.model_extra["mixture"]["experts"] == EXPERTS
    stream = list(client.responses.create(model="ens", input=INPUT, stream=True))
    assert isinstance(stream[-1], ResponseCompletedEvent)
    text = "".join(e.delta for e in stream if isinstance(e, ResponseTextDeltaEvent))
    assert text == stream[-1].response.output_text == SCRIPT
    assert client.responses.retrieve(response.id).output_text == SCRIPT


# ---------------------------------------------------------------- the store


def test_a_stored_response_is_retrieved_and_an_unstored_one_is_a_404(api):
    stored = respond(api, max_output_tokens=3)
    assert api.get(f"/v1/responses/{stored['id']}").json() == stored
    unstored = respond(api, max_output_tokens=3, store=False)
    for response_id in (unstored["id"], "resp_nothing"):
        response = api.get(f"/v1/responses/{response_id}")
        assert response.status_code == 404
        assert response.json()["error"] == {
            "message": f"Response with id '{response_id}' not found.",
            "type": "invalid_request_error", "param": "response_id", "code": "response_not_found",
        }


def test_previous_response_id_continues_its_conversation_without_its_instructions(api):
    first = respond(api, instructions="Be terse.", max_output_tokens=5)
    second = respond(api, input="And then?", previous_response_id=first["id"], max_output_tokens=2)
    third = respond(api, input=[{"role": "user", "content": "End."}],
                    previous_response_id=second["id"], instructions="Be kind.", max_output_tokens=2)
    expected = chat(api, [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": INPUT}, {"role": "assistant", "content": SCRIPT[:5]},
        {"role": "user", "content": "And then?"}, {"role": "assistant", "content": SCRIPT[:2]},
        {"role": "user", "content": "End."},
    ], max_completion_tokens=2)
    assert third["usage"]["input_tokens"] == expected["usage"]["prompt_tokens"]
    assert third["previous_response_id"] == second["id"]


def test_the_store_forgets_the_oldest_past_its_bound():
    stack = serving_app()
    stack.app.state.serving_responses.store.max_responses = 2
    with TestClient(stack.app) as api:
        ids = [respond(api, max_output_tokens=1)["id"] for _ in range(3)]
        assert [api.get(f"/v1/responses/{i}").status_code for i in ids] == [404, 200, 200]
        # A chain outlives its forgotten start: each response keeps its whole conversation.
        assert respond(api, input="more", previous_response_id=ids[2], max_output_tokens=1)


def test_an_unknown_previous_response_id_is_a_404_naming_it(api):
    response = api.post("/v1/responses", json={"input": INPUT, "previous_response_id": "resp_x"})
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["param"] == "previous_response_id" and "resp_x" in error["message"]


# ---------------------------------------------------------------- refusals and bad input

CONTEXT_FILLER = "word " * MAX_MODEL_LEN
# (id, request fields, status, param)
BAD = [
    ("unknown-item-type", {"input": [{"type": "web_search_call", "id": "x"}]}, 400, "input.0"),
    ("item-reference", {"input": [{"role": "user", "content": "a"},
                                  {"type": "item_reference", "id": "msg_1"}]}, 400, "input.1"),
    ("image-part", {"input": [{"role": "user", "content": [
        {"type": "input_text", "text": "a"}, {"type": "input_image", "image_url": "x"}]}]},
     400, "input.0.content.1"),
    ("bad-role", {"input": [{"role": "tool", "content": "a"}]}, 400, "input"),
    ("item-without-role", {"input": [{"content": "a"}]}, 400, "input"),
    ("empty-input", {"input": ""}, 400, "input"),
    ("built-in-tool", {"tools": [{"type": "web_search"}]}, 400, "tools.0"),
    ("function-tool-here", {"tools": [{"type": "function", "name": "f", "parameters": {}}]},
     400, "tools"),
    ("function-call-item-here", {"input": [
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "ok"}]}, 400, "input"),
    ("hosted-tool-choice", {"tool_choice": {"type": "file_search"}}, 400, "tool_choice"),
    ("required-without-tools", {"tool_choice": "required"}, 400, "tool_choice"),
    ("input-too-long", {"input": CONTEXT_FILLER}, 400, "input"),
    ("max-output-tokens-too-many", {"max_output_tokens": 10**6}, 400, "max_output_tokens"),
    ("max-output-tokens-zero", {"max_output_tokens": 0}, 400, "max_output_tokens"),
    ("include-other", {"include": ["reasoning.encrypted_content"]}, 400, "include"),
    ("top-logprobs-alone", {"top_logprobs": 3}, 400, "top_logprobs"),
    ("too-many-logprobs", {"include": [LOGPROBS], "top_logprobs": 21}, 400, "top_logprobs"),
    ("verbosity", {"text": {"verbosity": "low"}}, 400, "text.verbosity"),
    ("unknown-format", {"text": {"format": {"type": "yaml"}}}, 400, "text.format"),
    ("schema-without-name", {"text": {"format": {"type": "json_schema", "schema": {}}}},
     400, "text.format.json_schema.name"),
    ("stream-prompt-logprobs", {"stream": True, "prompt_logprobs": 1}, 400, "prompt_logprobs"),
    ("two-constraints", {"text": {"format": {"type": "json_object"}},
                         "structured_outputs": {"regex": "a+"}}, 400, "structured_outputs"),
    ("unknown-model", {"model": "nope"}, 404, "model"),
    ("unknown-expert", {"mixture": {"weights": {"nope": 1.0}}}, 400, "mixture.weights"),
    ("background", {"background": True}, 400, "background"),
    ("reasoning", {"reasoning": {"effort": "high"}}, 400, "reasoning"),
    ("truncation-auto", {"truncation": "auto"}, 400, "truncation"),
    ("conversation", {"conversation": "conv_1"}, 400, "conversation"),
    ("prompt-template", {"prompt": {"id": "pmpt_1"}}, 400, "prompt"),
    ("chat-max-tokens", {"max_tokens": 4}, 400, "max_tokens"),
    ("chat-messages", {"messages": [{"role": "user", "content": "a"}]}, 400, "messages"),
    ("chat-response-format", {"response_format": {"type": "json_object"}}, 400, "response_format"),
    ("n", {"n": 2}, 400, "n"),
    ("beam-search", {"use_beam_search": True}, 400, "use_beam_search"),
]


@pytest.mark.parametrize("fields, status, param", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_or_unsupported_input_is_a_4xx_openai_error_naming_the_field(
    stack, api, fields, status, param
):
    response = api.post("/v1/responses", json={"input": INPUT, **fields})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"] and error["type"]
    assert stack.engine.params == {}  # refused before any engine work


@pytest.mark.parametrize(
    "fields",
    [{"background": False}, {"truncation": "disabled"}, {"reasoning": {}}, {"n": 1},
     {"service_tier": "auto"}, {"prompt_cache_key": "k"}, {"safety_identifier": "s"},
     {"tool_choice": "none"}, {"tool_choice": "auto"}, {"parallel_tool_calls": False},
     {"include": []}, {"store": False}, {"stream_options": {"include_obfuscation": False}}],
    ids=lambda fields: "-".join(f"{k}={v}" for k, v in fields.items()),
)
def test_values_that_change_nothing_are_accepted(api, fields):
    assert output_text(respond(api, max_output_tokens=2, **fields)) == SCRIPT[:2]


def test_the_input_too_long_error_is_chats_context_length_error(api):
    error = api.post("/v1/responses", json={"input": CONTEXT_FILLER}).json()["error"]
    assert error["code"] == "context_length_exceeded" and str(MAX_MODEL_LEN) in error["message"]
    over = api.post("/v1/responses", json={"input": INPUT, "max_output_tokens": MAX_MODEL_LEN})
    assert over.json()["error"]["param"] == "max_output_tokens"
