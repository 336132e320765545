"""The clients people bring, unchanged, in front of gatemix: LangChain, LiteLLM, the Agents SDK.

Each test checks what the client received against what the plain ``openai``
client gets for the same greedy request, or against the constraint the server
enforced. They run on the routed session server (``routed_server``), the one
that serves tools (a Hermes template and parser): the main server's template
renders none. The routed server takes no API key; the clients send a placeholder.

The tiny demo model writes gibberish, so the structured output and the tool
call hold only through constrained decoding: that is what those two tests
check. Whitespace-only tokens are biased to -100 (as in ``test_tools.py``), so
a JSON object closes in a few tokens. The Agents SDK runs over both APIs it
speaks: the Responses API (its default) and chat completions.

The clients are imported in the tests: LiteLLM alone takes seconds to import,
and ``make test-fast`` collects this file without running it.
"""

from __future__ import annotations

import json
from typing import Literal

import pytest
from conftest import ENSEMBLE
from pydantic import BaseModel
from server_harness import whitespace_bias

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "user", "content": "Say hello."}]
MAX_TOKENS = 8


class Color(BaseModel):
    color: Literal["red", "green", "blue"]
    bright: bool


@pytest.fixture(scope="module")
def no_whitespace(routed_server) -> dict[str, int]:
    from transformers import AutoTokenizer

    return whitespace_bias(AutoTokenizer.from_pretrained(str(routed_server.model_dir)))


@pytest.fixture(scope="module")
def expected(routed_client):
    """What the plain ``openai`` client gets for the greedy request every client here sends."""
    return routed_client.chat.completions.create(
        model=ENSEMBLE, messages=MESSAGES, temperature=0, max_tokens=MAX_TOKENS
    )


def _chat_model(routed_server, **settings):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(
        model=ENSEMBLE, base_url=f"{routed_server.base_url}/v1", api_key="none",
        temperature=0, max_retries=0, timeout=120, **settings,
    )


def test_langchain_invoke_returns_the_text_and_the_token_usage(routed_server, expected):
    message = _chat_model(routed_server, max_tokens=MAX_TOKENS).invoke(MESSAGES[0]["content"])
    assert isinstance(message.content, str) and message.content
    assert message.content == expected.choices[0].message.content
    usage = message.response_metadata["token_usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) == (
        expected.usage.prompt_tokens, expected.usage.completion_tokens, expected.usage.total_tokens
    )
    assert message.usage_metadata["output_tokens"] == expected.usage.completion_tokens


def test_langchain_stream_arrives_in_chunks_that_join_to_the_whole_text(routed_server, expected):
    chat = _chat_model(routed_server, max_tokens=MAX_TOKENS, stream_usage=True)
    chunks = list(chat.stream(MESSAGES[0]["content"]))
    text = "".join(chunk.content for chunk in chunks)
    assert len(chunks) > 1 and text and text == expected.choices[0].message.content
    whole = sum(chunks[1:], chunks[0])  # LangChain's own merge, usage included
    assert whole.usage_metadata["output_tokens"] == expected.usage.completion_tokens


def test_langchain_structured_output_parses_by_constrained_decoding(routed_server, no_whitespace):
    """``method="json_schema"`` sends ``response_format`` json_schema (strict), which the
    engine's structured outputs hold the mixture to; LangChain parses the reply."""
    chat = _chat_model(routed_server, max_tokens=60, logit_bias=no_whitespace)
    structured = chat.with_structured_output(Color, method="json_schema", include_raw=True)
    result = structured.invoke("Pick a color.")
    assert result["parsing_error"] is None and isinstance(result["parsed"], Color)
    assert Color.model_validate_json(result["raw"].content) == result["parsed"]
    assert result["raw"].response_metadata["finish_reason"] == "stop"


def test_litellm_returns_what_the_openai_client_gets_and_the_mixture(
    routed_server, expected, monkeypatch
):
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no fetch of the price list
    import litellm

    response = litellm.completion(
        model=f"openai/{ENSEMBLE}", api_base=f"{routed_server.base_url}/v1", api_key="none",
        messages=MESSAGES, temperature=0, max_tokens=MAX_TOKENS, num_retries=0,
    )
    assert response.choices[0].message.content == expected.choices[0].message.content
    assert response.choices[0].message.content
    assert (response.usage.prompt_tokens, response.usage.completion_tokens,
            response.usage.total_tokens) == (expected.usage.prompt_tokens,
                                             expected.usage.completion_tokens,
                                             expected.usage.total_tokens)
    # LiteLLM keeps the response's unknown fields (`mixture`) and puts a choice's under
    # `provider_specific_fields`.
    report = expected.model_extra["mixture"]
    for mixture in (response.mixture, response.choices[0].provider_specific_fields["mixture"]):
        assert mixture["experts"] == report["experts"]
        assert mixture["mean_weights"] == pytest.approx(report["mean_weights"], abs=1e-6)


def _weather_agent(routed_server, no_whitespace, model_class, calls: list[str], **agent_args):
    """An agent over gatemix with one tool, which records the city of each call; ``tool_choice``
    names the tool: the tiny model would not call it by itself, and vLLM's parser then holds
    the output to the arguments' schema."""
    from agents import Agent, ModelSettings, function_tool
    from openai import AsyncOpenAI

    @function_tool
    def weather(city: Literal["Rome", "Oslo"]) -> str:
        """Weather."""
        calls.append(city)
        return "sunny"

    client = AsyncOpenAI(base_url=f"{routed_server.base_url}/v1", api_key="none", max_retries=0, timeout=120)
    return Agent(
        name="weather", tools=[weather], model=model_class(model=ENSEMBLE, openai_client=client),
        model_settings=ModelSettings(
            tool_choice="weather", temperature=0, extra_body={"logit_bias": no_whitespace}
        ),
        **agent_args,
    )


def test_agents_sdk_agent_calls_its_tool_then_answers(routed_server, no_whitespace):
    """One agent, one function tool, through chat completions (``OpenAIChatCompletionsModel``).

    The SDK's ``reset_tool_choice`` (its default) frees the second turn to answer in
    text. No ``max_tokens``: the tool's definition takes about 170 of the 256-token
    context and the call's round trip about 70 more, so each turn gets the rest of the
    context.
    """
    from agents import OpenAIChatCompletionsModel, RunConfig, Runner

    calls: list[str] = []
    agent = _weather_agent(routed_server, no_whitespace, OpenAIChatCompletionsModel, calls)
    result = Runner.run_sync(agent, "Rome?", run_config=RunConfig(tracing_disabled=True))
    assert len(calls) == 1 and calls[0] in ("Rome", "Oslo")  # the tool ran, with parsed arguments
    (call,) = [item.raw_item for item in result.new_items if item.type == "tool_call_item"]
    assert call.name == "weather" and json.loads(call.arguments) == {"city": calls[0]}
    (output,) = [item.output for item in result.new_items if item.type == "tool_call_output_item"]
    assert output == "sunny"
    assert len(result.raw_responses) == 2  # the call, then the answer after the tool's output
    assert isinstance(result.final_output, str) and result.final_output


def test_agents_sdk_default_model_runs_its_tool_through_the_responses_api(routed_server, no_whitespace):
    """The SDK's default model, ``OpenAIResponsesModel``: the call comes back as a ``function_call``
    output item, the SDK runs the tool, and the tool's output is the agent's answer
    (``stop_on_first_tool``). A second, free-text turn is left out: the tiny model's text runs
    to the end of the context, which the Responses API reports as ``incomplete`` and the SDK
    raises on (chat completions' ``length`` it accepts, as the test above shows)."""
    from agents import OpenAIResponsesModel, RunConfig, Runner

    calls: list[str] = []
    agent = _weather_agent(routed_server, no_whitespace, OpenAIResponsesModel, calls,
                           tool_use_behavior="stop_on_first_tool")
    result = Runner.run_sync(agent, "Rome?", run_config=RunConfig(tracing_disabled=True))
    assert len(calls) == 1 and calls[0] in ("Rome", "Oslo")
    (response,) = result.raw_responses
    (call,) = response.output
    assert call.type == "function_call" and call.name == "weather"
    assert json.loads(call.arguments) == {"city": calls[0]}
    assert response.usage.output_tokens > 0 and response.usage.input_tokens > 0
    assert result.final_output == "sunny"
