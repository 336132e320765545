"""Tool calls through vLLM's tool parsers, where the chat template renders tools.

Tools need two things: the chat template must read ``tools`` (else the model
never sees them) and the server must have a ``tool_call_parser`` (a vLLM parser
name, e.g. ``hermes``). Without both, a request with ``tools`` is refused with
a 400 naming ``tools``: answering it as if they were absent would be wrong.

The parsing is vLLM's own, as under ``vllm serve --tool-call-parser``: the
parser's ``adjust_request`` adds the structured outputs that hold the model to
the call format (for ``required`` or a named function, and vLLM's structural
tags for ``auto``), then ``parse`` (a whole choice) or ``parse_delta`` (a
stream, one parser per choice) turns the text into calls. The parsers read
vLLM's own request model, so the request is restated in it once.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

from pydantic import ValidationError

from gatemix.server.chat_template import ChatRenderer
from gatemix.server.errors import bad_request, unsupported_field
from gatemix.server.protocol import ChatCompletionRequest
from gatemix.server.protocol_structured import (
    FunctionCall,
    FunctionCallDelta,
    ToolCall,
    ToolCallDelta,
)

logger = logging.getLogger(__name__)


@dataclass
class ToolPlan:
    """One request's tools: vLLM's restated request, and what it asks of sampling."""

    vllm_request: object  # vllm ChatCompletionRequest, after the parser's adjust_request
    tool_dicts: list[dict]  # as the chat template sees them
    structured_outputs: object | None  # vllm StructuredOutputsParams, or None
    skip_special_tokens: bool
    tool_choice: object  # "none" | "auto" | "required" | NamedToolChoice


class ToolCalling:
    """The server's tool support; ``why_not`` says why there is none."""

    def __init__(self, *, tokenizer, renderer: ChatRenderer, parser_name: str | None) -> None:
        self.tokenizer = tokenizer
        self.parser_cls = None
        self.why_not: str | None = None
        if parser_name is None:
            self.why_not = "the server has no tool parser (--tool-call-parser)"
        elif not renderer.renders_tools:
            self.why_not = "the chat template does not render tools"
        else:
            # vLLM takes seconds to import: only a server with a tool parser pays for it.
            from vllm.parser.parser_manager import ParserManager

            self.parser_cls = ParserManager.get_parser(
                tool_parser_name=parser_name, enable_auto_tools=True, tokenizer=tokenizer
            )

    @property
    def supported(self) -> bool:
        return self.parser_cls is not None

    def plan(self, request: ChatCompletionRequest, messages: list[dict]) -> ToolPlan | None:
        """The request's tool plan, None without tools; a 400 for tools this server cannot use."""
        if not request.tools:
            if request.tool_choice not in (None, "none"):
                raise bad_request("tool_choice needs tools", "tool_choice")
            return None
        if not self.supported:
            raise unsupported_field("tools", self.why_not)
        names = [tool.function.name for tool in request.tools]
        choice = request.tool_choice or "auto"
        if not isinstance(choice, str) and choice.function.name not in names:
            raise bad_request(
                f"tool_choice names {choice.function.name!r}, which is not in tools {names}",
                "tool_choice",
            )
        vllm_request = self._vllm_request(request, messages)
        parser = self.parser_cls(self.tokenizer, vllm_request.tools)
        vllm_request = parser.adjust_request(vllm_request)
        return ToolPlan(
            vllm_request=vllm_request,
            tool_dicts=[tool.model_dump(exclude_none=True) for tool in request.tools],
            structured_outputs=vllm_request.extract_structured_outputs(),
            skip_special_tokens=vllm_request.skip_special_tokens,
            tool_choice=choice,
        )

    def _vllm_request(self, request: ChatCompletionRequest, messages: list[dict]):
        # vLLM takes seconds to import: only a server with a tool parser reaches here.
        from vllm.entrypoints.openai.chat_completion.protocol import (
            ChatCompletionRequest as VllmChatRequest,
        )

        fields = request.model_dump(
            include={"tools", "tool_choice", "parallel_tool_calls", "response_format",
                     "skip_special_tokens"},
            exclude_none=True,
            by_alias=True,
        )
        if request.structured_outputs is not None:
            fields["structured_outputs"] = request.structured_outputs.model_dump(
                by_alias=True, exclude_none=True
            )
        fields.setdefault("tool_choice", "auto")
        try:
            return VllmChatRequest.model_validate({"messages": messages, **fields})
        except (ValidationError, ValueError) as exc:
            raise bad_request(f"vLLM's tool parser refused the request: {exc}", "tools") from exc

    def parser(self, plan: ToolPlan):
        """A fresh parser: they hold stream state, so each choice has its own."""
        return self.parser_cls(self.tokenizer, plan.vllm_request.tools)


def parse_choice(parser, plan: ToolPlan, text: str, token_ids: list[int]):
    """``(content, tool calls)`` of a whole choice's text."""
    _reasoning, content, calls = parser.parse(
        text, plan.vllm_request, enable_auto_tools=True, model_output_token_ids=token_ids
    )
    tool_calls = [
        ToolCall(
            id=call.id or f"call_{uuid.uuid4().hex[:24]}",
            function=FunctionCall(name=call.name, arguments=call.arguments),
        )
        for call in calls or []
    ]
    return content, tool_calls


def finish_reason(plan: ToolPlan | None, called: bool, reason: str | None) -> str | None:
    """OpenAI's: "tool_calls" when ``auto`` or ``required`` called; a named function "stop"."""
    if plan is None or reason is None or not called:
        return reason
    return "stop" if not isinstance(plan.tool_choice, str) else "tool_calls"


def parse_delta(parser, plan: ToolPlan, text: str, token_ids: list[int], prompt_ids, finished):
    """``(content, tool call deltas)`` of one stream delta, or ``(None, [])``."""
    message = parser.parse_delta(
        text, list(token_ids), plan.vllm_request, list(prompt_ids), finished=finished
    )
    if message is None:
        return None, []
    deltas = [
        ToolCallDelta(
            index=call.index,
            id=call.id,
            type=call.type,
            function=FunctionCallDelta(name=call.function.name, arguments=call.function.arguments)
            if call.function is not None
            else None,
        )
        for call in message.tool_calls
    ]
    return message.content, deltas
