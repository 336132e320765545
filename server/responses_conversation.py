"""A Responses request as the chat request it is served as, and its output as chat messages.

The Responses API is served by the chat path (``serving_chat.py``): the input
items become chat messages, rendered by the same chat template; the sampling
fields, ``text.format`` and the function tools become their chat fields, so
the same checks, structured outputs and tool parser apply. What the chat
request cannot carry is refused here, by name, before any work:

* request fields OpenAI defines that would change the result (``background``,
  ``reasoning``, ``truncation: auto``, ...), and chat's own fields sent to the
  wrong endpoint (``max_tokens``, ``messages``, ``response_format``, ...);
* input items and content parts other than text, function calls and their
  outputs; built-in tools; tool choices other than none/auto/required/a function.
"""

from __future__ import annotations

from pydantic import ValidationError

from gatemix.server.errors import bad_request, unsupported_field
from gatemix.server.protocol import ChatCompletionRequest, SamplingExtensions
from gatemix.server.protocol_responses import (
    LOGPROBS_INCLUDE,
    FunctionCallItem,
    FunctionCallOutputItem,
    FunctionToolCall,
    OtherItem,
    OtherPart,
    OtherTool,
    OutputMessage,
    ResponsesRequest,
    TextContent,
    ToolChoiceFunction,
)

# OpenAI fields the server does not do, the values that change nothing, and why
# (``openapi.py`` declares them so: the document accepts only those values, or null).
REFUSED_FIELDS: dict[str, tuple[tuple, str]] = {
    "background": ((False,), "a response is made while the request waits (no background mode)"),
    "conversation": ((), "conversations are not kept: chain responses with previous_response_id"),
    "prompt": ((), "there are no stored prompt templates"),
    "reasoning": (({},), "the experts have no reasoning mode"),
    "truncation": (("disabled",), "the input is never truncated: one too long is a 400"),
    "context_management": ((), "the context is never compacted"),
    # chat's fields, sent to the Responses API
    "messages": ((), "the Responses API's field is input"),
    "max_tokens": ((), "the Responses API's field is max_output_tokens"),
    "max_completion_tokens": ((), "the Responses API's field is max_output_tokens"),
    "response_format": ((), "the Responses API's field is text.format"),
    "logprobs": ((False,), f"the Responses API's is include [{LOGPROBS_INCLUDE!r}]"),
    "n": ((1,), "a response has one output"),
    "add_generation_prompt": ((True,), "the answer always follows the input"),
}
# Taken as they are from the request: vLLM's sampling extensions, gatemix's mixture, and these.
_SHARED_FIELDS = (
    "model", "metadata", "user", "temperature", "top_p", "frequency_penalty", "presence_penalty",
    "logit_bias", "seed", "stop", *SamplingExtensions.model_fields,
)


def refuse_unsupported(request: ResponsesRequest) -> None:
    """A 400 naming the first field, item, tool or value this server cannot honour."""
    extra = request.model_extra or {}
    for name, (harmless, why) in REFUSED_FIELDS.items():
        value = extra.get(name)
        if value is not None and not any(_same_json(value, h) for h in harmless):
            raise unsupported_field(name, why)
    for value in request.include or []:
        if value != LOGPROBS_INCLUDE:
            raise unsupported_field("include", f"only {LOGPROBS_INCLUDE!r} can be, not {value!r}")
    if request.top_logprobs and LOGPROBS_INCLUDE not in (request.include or []):
        raise bad_request(f"top_logprobs needs include [{LOGPROBS_INCLUDE!r}]", "top_logprobs")
    if request.structured_outputs is not None and _response_format(request) is not None:
        raise bad_request("give text.format or structured_outputs, not both", "structured_outputs")
    for i, tool in enumerate(request.tools or []):
        if isinstance(tool, OtherTool):
            raise unsupported_field(
                f"tools.{i}", f"{tool.type!r} is a built-in tool; only function tools are served"
            )
    if isinstance(request.tool_choice, dict):
        kind = request.tool_choice.get("type")
        raise unsupported_field(
            "tool_choice", f"{kind!r}: only none, auto, required or a function are served"
        )


def _same_json(value, harmless) -> bool:
    """JSON equality: ``true`` is not ``1`` (as Python's ``True == 1`` would have it)."""
    if isinstance(value, bool) or isinstance(harmless, bool):
        return type(value) is type(harmless) and value == harmless
    return value == harmless


def input_messages(request: ResponsesRequest) -> list[dict]:
    """The input as chat messages (``ChatMessage`` fields), function calls and outputs included."""
    if isinstance(request.input, str):
        return [{"role": "user", "content": request.input}]
    messages: list[dict] = []
    for i, item in enumerate(request.input):
        if isinstance(item, OtherItem):
            raise unsupported_field(
                f"input.{i}",
                f"{item.type!r} items are not served (only message, function_call and "
                "function_call_output items)",
            )
        if isinstance(item, FunctionCallItem):
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments}}
            if messages and messages[-1]["role"] == "assistant":  # one turn: its text, its calls
                messages[-1].setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif isinstance(item, FunctionCallOutputItem):
            text = _text(item.output, f"input.{i}.output")
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": text})
        else:
            messages.append({"role": item.role, "content": _text(item.content, f"input.{i}.content")})
    return messages


def _text(content: TextContent, param: str) -> str:
    if isinstance(content, str):
        return content
    for j, part in enumerate(content):
        if isinstance(part, OtherPart):
            raise unsupported_field(
                f"{param}.{j}", f"{part.type!r}: only text parts (input_text, output_text) are read"
            )
    return "".join(part.text for part in content)


def output_messages(output: list[OutputMessage | FunctionToolCall]) -> list[dict]:
    """A response's output as the assistant's chat message, for the next response's conversation."""
    text = "".join(part.text for item in output if item.type == "message" for part in item.content)
    calls = [
        {"id": item.call_id, "type": "function",
         "function": {"name": item.name, "arguments": item.arguments}}
        for item in output
        if item.type == "function_call"
    ]
    return [{"role": "assistant", "content": text, **({"tool_calls": calls} if calls else {})}]


def chat_request(request: ResponsesRequest, messages: list[dict]) -> ChatCompletionRequest:
    """The chat request the response is made by: the same sampling, constraint and tools."""
    fields = {name: getattr(request, name) for name in _SHARED_FIELDS}
    fields = {name: value for name, value in fields.items() if value is not None}
    logprobs = LOGPROBS_INCLUDE in (request.include or [])
    fields.update(
        messages=messages,
        stream=bool(request.stream),
        max_completion_tokens=request.max_output_tokens,
        logprobs=logprobs,
        top_logprobs=(request.top_logprobs or 0) if logprobs else None,
        response_format=_response_format(request),
        parallel_tool_calls=request.parallel_tool_calls,
    )
    if request.tools:
        fields["tools"] = [
            {"type": "function", "function": tool.model_dump(exclude={"type"}, exclude_none=True)}
            for tool in request.tools
        ]
    choice = request.tool_choice
    if isinstance(choice, ToolChoiceFunction):
        choice = {"type": "function", "function": {"name": choice.name}}
    elif choice == "auto" and not request.tools:
        choice = None  # OpenAI's default, with nothing to call (chat's refuses it without tools)
    fields["tool_choice"] = choice
    # Fields nobody declared go on (chat refuses or honours vLLM's: guided_json, beam search, ...).
    extra = {
        name: value
        for name, value in (request.model_extra or {}).items()
        if name not in ChatCompletionRequest.model_fields
    }
    try:
        return ChatCompletionRequest.model_validate({**extra, **fields})
    except ValidationError as exc:
        first = exc.errors()[0]
        raise bad_request(f"the input is not a valid conversation: {first['msg']}", "input") from exc


def _response_format(request: ResponsesRequest) -> dict | None:
    text_format = request.text.format if request.text is not None else None
    if text_format is None or text_format.type == "text":
        return None
    if text_format.type == "json_object":
        return {"type": "json_object"}
    schema = text_format.model_dump(exclude={"type"}, exclude_none=True, by_alias=True)
    return {"type": "json_schema", "json_schema": schema}
