"""Tool calls through vLLM's Hermes parser, on the routed server (its template renders tools).

vLLM's parser holds the mixture to the call format with structured outputs, so
even the tiny random model calls the named tool with arguments that follow the
function's schema; then the parser turns the text into ``tool_calls``, in a
whole response and in a stream alike. (The main server's template renders no
tools, and refuses them: ``test_bad_input.py``.)
"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from conftest import ENSEMBLE
from server_harness import whitespace_bias

pytestmark = pytest.mark.slow

WEATHER = {
    "type": "object",
    "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]}},
    "required": ["city"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "the weather in a city",
            "parameters": WEATHER,
            "strict": True,
        },
    }
]
MESSAGES = [{"role": "user", "content": "What is the weather in Rome?"}]


@pytest.fixture(scope="module")
def no_whitespace(routed_server) -> dict[str, int]:
    from transformers import AutoTokenizer

    return whitespace_bias(AutoTokenizer.from_pretrained(str(routed_server.model_dir)))


def _check_call(call) -> None:
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)


@pytest.mark.parametrize(
    "tool_choice, finish_reason",
    [("required", "tool_calls"), ({"type": "function", "function": {"name": "get_weather"}}, "stop")],
    ids=["required", "named"],
)
def test_a_forced_tool_call_follows_the_function_schema(
    routed_client, no_whitespace, tool_choice, finish_reason
):
    choice = routed_client.chat.completions.create(
        model=ENSEMBLE, messages=MESSAGES, tools=TOOLS, tool_choice=tool_choice,
        parallel_tool_calls=False, max_tokens=80, logit_bias=no_whitespace, seed=1,
    ).choices[0]
    assert choice.finish_reason == finish_reason
    assert not choice.message.content and len(choice.message.tool_calls) == 1
    _check_call(choice.message.tool_calls[0])


def test_a_streamed_tool_call_assembles_to_the_whole_one(routed_client, no_whitespace):
    common = {
        "model": ENSEMBLE, "messages": MESSAGES, "tools": TOOLS, "tool_choice": "required",
        "parallel_tool_calls": False, "max_tokens": 80, "logit_bias": no_whitespace, "seed": 4,
    }
    whole = routed_client.chat.completions.create(**common).choices[0].message.tool_calls[0]
    name, arguments, reasons, ids = None, "", [], set()
    for chunk in routed_client.chat.completions.create(**common, stream=True):
        for choice in chunk.choices:
            reasons.append(choice.finish_reason)
            for call in choice.delta.tool_calls or []:
                assert call.index == 0
                ids |= {call.id} if call.id else set()
                name = name or (call.function.name if call.function else None)
                arguments += (call.function.arguments or "") if call.function else ""
    assert name == whole.function.name and len(ids) == 1
    assert json.loads(arguments) == json.loads(whole.function.arguments)
    assert reasons[-1] == "tool_calls"


def test_auto_without_a_call_answers_in_text_and_tool_results_render(routed_client, no_whitespace):
    # tool_choice none: the template still shows the tools, the parser calls nothing.
    plain = routed_client.chat.completions.create(
        model=ENSEMBLE, messages=MESSAGES, tools=TOOLS, tool_choice="none", max_tokens=8,
    ).choices[0]
    assert plain.message.tool_calls in (None, []) and plain.finish_reason in ("stop", "length")
    # A whole round: the assistant's call and the tool's answer go back through the template.
    history = MESSAGES + [
        {"role": "assistant", "content": "", "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 24 C"},
    ]
    answer = routed_client.chat.completions.create(
        model=ENSEMBLE, messages=history, tools=TOOLS, max_tokens=8,
    ).choices[0]
    assert answer.finish_reason in ("stop", "length", "tool_calls")


def test_tool_choice_must_name_a_given_tool(routed_client):
    import openai

    with pytest.raises(openai.BadRequestError) as error:
        routed_client.chat.completions.create(
            model=ENSEMBLE, messages=MESSAGES, tools=TOOLS, max_tokens=4,
            tool_choice={"type": "function", "function": {"name": "send_email"}},
        )
    assert error.value.body["param"] == "tool_choice"


def test_tools_need_both_a_parser_and_a_template_that_renders_them(demo_paths):
    """The demo's template renders no tools: with it, even a parser gives no tool support."""
    from transformers import AutoTokenizer

    from gatemix.server.chat_template import FALLBACK_CHAT_TEMPLATE, ChatRenderer
    from gatemix.server.tools import ToolCalling

    tokenizer = AutoTokenizer.from_pretrained(str(next(iter(demo_paths.expert_dirs.values()))))
    demo = (Path(__file__).parents[2] / "demo" / "chat_template.jinja").read_text()
    tools_template = Path(__file__).with_name("tools_chat_template.jinja").read_text()
    for template, parser, why in (
        (demo, "hermes", "does not render tools"),
        (FALLBACK_CHAT_TEMPLATE, "hermes", "does not render tools"),
        (tools_template, None, "no tool parser"),
    ):
        support = ToolCalling(tokenizer=tokenizer, renderer=ChatRenderer(tokenizer, template),
                              parser_name=parser)
        assert not support.supported and why in support.why_not
    assert ToolCalling(
        tokenizer=tokenizer, renderer=ChatRenderer(tokenizer, tools_template), parser_name="hermes"
    ).supported
