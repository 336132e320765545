"""``/v1/responses`` on a real server, through the ``openai`` client's ``responses`` resource.

The tests run on the routed session server (``routed_server``: the random router,
whose per-token weights vary with the context, and tool calling), like
``test_clients.py``. Each greedy response is checked against
the same conversation through chat completions, which it is served by: the
same text, the same token counts, the same gate.
"""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from conftest import ENSEMBLE
from server_harness import whitespace_bias

pytestmark = pytest.mark.slow

INSTRUCTIONS = "Answer briefly."
QUESTION = "What is the weather in Rome?"
MAX_TOKENS = 8
WEATHER = {
    "type": "object",
    "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]}},
    "required": ["city"],
    "additionalProperties": False,
}
TOOL = {"type": "function", "name": "get_weather", "description": "the weather in a city",
        "parameters": WEATHER, "strict": True}


@pytest.fixture(scope="module")
def no_whitespace(routed_server) -> dict[str, int]:
    from transformers import AutoTokenizer

    return whitespace_bias(AutoTokenizer.from_pretrained(str(routed_server.model_dir)))


def _chat(routed_client, messages: list[dict], **fields):
    return routed_client.chat.completions.create(
        model=ENSEMBLE, messages=messages, temperature=0, max_tokens=MAX_TOKENS,
        extra_body={"mixture": {"per_token": True}}, **fields,
    )


def _respond(routed_client, **fields):
    return routed_client.responses.create(
        model=ENSEMBLE, temperature=0, max_output_tokens=MAX_TOKENS,
        extra_body={"mixture": {"per_token": True}}, **fields,
    )


def _same_answer(response, chat) -> None:
    """The response says what chat said, counts the same tokens and reports the same gate."""
    assert response.output_text == chat.choices[0].message.content
    usage = response.usage
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (
        chat.usage.prompt_tokens, chat.usage.completion_tokens, chat.usage.total_tokens
    )
    mixture, chat_mixture = response.model_extra["mixture"], chat.model_extra["mixture"]
    assert len(mixture["per_token"]) == usage.output_tokens
    for row, chat_row in zip(mixture["per_token"], chat_mixture["per_token"], strict=True):
        assert row == pytest.approx(chat_row, abs=1e-6) and sum(row) == pytest.approx(1.0)
    assert mixture["mean_weights"] == pytest.approx(chat_mixture["mean_weights"], abs=1e-6)


def test_a_response_answers_as_chat_completions_does_at_temperature_0(routed_client):
    response = _respond(routed_client, instructions=INSTRUCTIONS, input=QUESTION)
    chat = _chat(routed_client, [{"role": "system", "content": INSTRUCTIONS},
                                 {"role": "user", "content": QUESTION}])
    _same_answer(response, chat)
    assert response.object == "response" and response.model == ENSEMBLE
    finish = chat.choices[0].finish_reason
    assert response.status == ("incomplete" if finish == "length" else "completed")
    assert routed_client.responses.retrieve(response.id).output_text == response.output_text


def test_a_stream_sends_the_events_in_order_and_the_same_answer(routed_client):
    whole = _respond(routed_client, input=QUESTION)
    events = list(_respond(routed_client, input=QUESTION, stream=True))
    kinds = [event.type for event in events]
    deltas = kinds.count("response.output_text.delta")
    assert deltas >= 1 and kinds == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.content_part.added", *["response.output_text.delta"] * deltas,
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.incomplete" if whole.status == "incomplete" else "response.completed",
    ]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    text = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    final = events[-1].response
    assert text == final.output_text == whole.output_text
    assert final.usage.output_tokens == whole.usage.output_tokens
    assert final.model_extra["mixture"]["mean_weights"] == pytest.approx(
        whole.model_extra["mixture"]["mean_weights"], abs=1e-6
    )


def test_previous_response_id_continues_the_conversation(routed_client):
    first = _respond(routed_client, instructions=INSTRUCTIONS, input=QUESTION)
    second = _respond(routed_client, input="And in Oslo?", previous_response_id=first.id)
    chat = _chat(routed_client, [
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "And in Oslo?"},
    ])
    _same_answer(second, chat)
    assert second.previous_response_id == first.id


def test_text_format_json_schema_constrains_the_output(routed_client, no_whitespace):
    response = routed_client.responses.create(
        model=ENSEMBLE, input=QUESTION, max_output_tokens=60,
        text={"format": {"type": "json_schema", "name": "weather", "schema": WEATHER,
                         "strict": True}},
        extra_body={"logit_bias": no_whitespace, "seed": 1},
    )
    assert response.status == "completed", response.output_text
    jsonschema.validate(json.loads(response.output_text), WEATHER)


def test_a_required_tool_is_called_and_its_result_goes_back(routed_client, no_whitespace):
    common = {"model": ENSEMBLE, "tools": [TOOL],
              "extra_body": {"logit_bias": no_whitespace, "seed": 1}}
    response = routed_client.responses.create(
        input=QUESTION, tool_choice="required", parallel_tool_calls=False, max_output_tokens=80,
        **common,
    )
    (call,) = [item for item in response.output if item.type == "function_call"]
    assert call.name == "get_weather" and call.call_id and call.status == "completed"
    jsonschema.validate(json.loads(call.arguments), WEATHER)
    answer = routed_client.responses.create(
        input=[{"role": "user", "content": QUESTION}, call.model_dump(exclude_none=True),
               {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}],
        tool_choice="none", max_output_tokens=MAX_TOKENS, **common,  # the context is 256
    )
    assert answer.status in ("completed", "incomplete") and answer.output[0].type == "message"


def test_a_streamed_tool_call_arrives_as_argument_deltas(routed_client, no_whitespace):
    common = {"model": ENSEMBLE, "input": QUESTION, "tools": [TOOL], "max_output_tokens": 80,
              "tool_choice": {"type": "function", "name": "get_weather"},
              "extra_body": {"logit_bias": no_whitespace, "seed": 4}}
    whole = routed_client.responses.create(**common)
    events = list(routed_client.responses.create(**common, stream=True))
    arguments = "".join(
        event.delta for event in events if event.type == "response.function_call_arguments.delta"
    )
    (done,) = [event for event in events if event.type == "response.function_call_arguments.done"]
    (call,) = [item for item in events[-1].response.output if item.type == "function_call"]
    (whole_call,) = [item for item in whole.output if item.type == "function_call"]
    assert done.arguments == call.arguments and json.loads(arguments) == json.loads(call.arguments)
    assert json.loads(call.arguments) == json.loads(whole_call.arguments)


def test_refusals_reach_the_client_as_openai_errors(routed_client):
    with pytest.raises(openai.BadRequestError) as error:
        routed_client.responses.create(model=ENSEMBLE, input=QUESTION,
                                       tools=[{"type": "web_search"}])
    assert error.value.body["param"] == "tools.0"
    with pytest.raises(openai.NotFoundError) as error:
        routed_client.responses.create(model=ENSEMBLE, input=QUESTION,
                                       previous_response_id="resp_unknown")
    assert error.value.body["param"] == "previous_response_id"
