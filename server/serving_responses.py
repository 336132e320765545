"""``POST /v1/responses`` and ``GET /v1/responses/{id}``: the Responses API over the chat path.

A request becomes the chat request it means (``responses_conversation.py``):
the instructions as a system message, then the previous response's
conversation, then the input. It is checked, rendered and run exactly as chat
runs it (``OpenAIServingChat.context``: the same template, sampling checks,
structured outputs, tool parser and engine jobs); its one choice becomes the
response's output items. The chat checks' errors name the Responses fields
(``input``, ``max_output_tokens``, ``text.format``).

Responses are kept (``store``, true by default) in a bounded in-memory store,
for ``GET`` and for ``previous_response_id``; a restart forgets them. Each
keeps its whole conversation (its instructions excepted, as OpenAI does), so
an older response may be forgotten without breaking a later one's chain.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from http import HTTPStatus

from gatemix.server.choices import ChoiceState
from gatemix.server.errors import APIError, internal_error
from gatemix.server.limits import Ticket
from gatemix.server.logprobs import prompt_logprobs
from gatemix.server.protocol import ChatCompletionRequest, UsageInfo
from gatemix.server.protocol_responses import (
    LOGPROBS_INCLUDE,
    FunctionToolCall,
    IncompleteDetails,
    OutputMessage,
    OutputText,
    ResponsesRequest,
    ResponsesResponse,
    ResponseUsage,
    TextConfig,
    ToolChoiceFunction,
)
from gatemix.server.responses_conversation import (
    chat_request,
    input_messages,
    output_messages,
    refuse_unsupported,
)
from gatemix.server.responses_stream import ResponseEvents, new_item_id
from gatemix.server.serving_chat import ChatContext, OpenAIServingChat
from gatemix.server.tools import parse_delta

logger = logging.getLogger(__name__)

# The chat checks' parameters, as the Responses API names them.
_RESPONSES_PARAMS = {
    "messages": "input",
    "max_completion_tokens": "max_output_tokens",
    "max_tokens": "max_output_tokens",
    "response_format": "text.format",
    "logprobs": "top_logprobs",
}


@dataclass(frozen=True)
class StoredResponse:
    response: ResponsesResponse
    conversation: list[dict]  # chat messages, its output included, its instructions not


class ResponseStore:
    """The last ``max_responses`` stored responses, oldest forgotten first.

    Each conversation was rendered within the context (or the request was
    refused), so an entry is at most about a context's text: the store is
    bounded by ``max_responses`` contexts.
    """

    def __init__(self, max_responses: int = 1000) -> None:
        self.max_responses = max_responses
        self._responses: OrderedDict[str, StoredResponse] = OrderedDict()

    def put(self, response: ResponsesResponse, conversation: list[dict]) -> None:
        self._responses[response.id] = StoredResponse(response, conversation)
        while len(self._responses) > self.max_responses:
            self._responses.popitem(last=False)

    def get(self, response_id: str, *, param: str) -> StoredResponse:
        """The stored response, or a 404 naming ``param`` (OpenAI's and vLLM's status)."""
        stored = self._responses.get(response_id)
        if stored is None:
            what = "Previous response" if param == "previous_response_id" else "Response"
            raise APIError(HTTPStatus.NOT_FOUND, f"{what} with id '{response_id}' not found.",
                           param=param, code="response_not_found")
        return stored


class OpenAIServingResponses:
    def __init__(self, *, chat: OpenAIServingChat, store: ResponseStore) -> None:
        self.chat = chat
        self.core = chat.core
        self.store = store

    def retrieve_response(self, response_id: str) -> ResponsesResponse:
        return self.store.get(response_id, param="response_id").response

    async def create_response(
        self, request: ResponsesRequest, ticket: Ticket
    ) -> ResponsesResponse | AsyncIterator[str]:
        """Validate and plan eagerly (errors become HTTP errors); stream or collect after."""
        refuse_unsupported(request)
        conversation = []
        if request.previous_response_id is not None:
            previous = self.store.get(request.previous_response_id, param="previous_response_id")
            conversation = list(previous.conversation)
        conversation += input_messages(request)
        instructions = [{"role": "system", "content": request.instructions}]
        messages = (instructions if request.instructions is not None else []) + conversation
        context = self._context(chat_request(request, messages), ticket)
        shell = _shell(request, context)
        if request.stream:
            return self._stream(request, context, shell, conversation)
        states = await self.core.generation.collect_choices(
            context.jobs, context.plan, context.deadline
        )
        response = self._response(request, context, shell, states[0])
        self._keep(request, response, conversation)
        return response

    def _context(self, chat: ChatCompletionRequest, ticket: Ticket) -> ChatContext:
        try:
            return self.chat.context(chat, ticket)
        except APIError as exc:
            root = (exc.param or "").split(".")[0]
            if root in _RESPONSES_PARAMS:
                exc.param = _RESPONSES_PARAMS[root]
            exc.message = exc.message.replace("max_completion_tokens", "max_output_tokens")
            raise

    def _keep(self, request: ResponsesRequest, response: ResponsesResponse, conversation) -> None:
        if request.store is not False:
            self.store.put(response, conversation + output_messages(response.output))

    def _response(
        self, request: ResponsesRequest, context: ChatContext, shell: ResponsesResponse,
        state: ChoiceState, output: list | None = None,
    ) -> ResponsesResponse:
        """The finished response; ``output`` as streamed, else made from the whole choice."""
        status = "incomplete" if state.finish_reason == "length" else "completed"
        if output is None:
            choice = self.chat.choice(context, state)
            output = _output_items(choice.message, choice.logprobs, status, request)
        return shell.model_copy(update={
            "status": status,
            "incomplete_details": IncompleteDetails(reason="max_output_tokens")
            if status == "incomplete" else None,
            "output": output,
            "usage": _usage(context.usage([state])),
            "mixture": self.core.mixture_report(state, context.plan),
            "prompt_logprobs": prompt_logprobs(
                context.prompts[0], state.prompt_logprobs, request.prompt_logprobs
            ),
        })

    async def _stream(
        self, request: ResponsesRequest, context: ChatContext, shell: ResponsesResponse,
        conversation: list[dict],
    ) -> AsyncIterator[str]:
        events = ResponseEvents(shell, first_call_only=request.parallel_tool_calls is False)
        for event in events.start():
            yield event
        try:
            state = None
            async with aclosing(self._deltas(context, events)) as deltas:
                async for batch, state in deltas:
                    for event in batch:
                        yield event
            status = "incomplete" if state.finish_reason == "length" else "completed"
            for event in events.close(status):
                yield event
            response = self._response(request, context, shell, state, list(events.output))
            self._keep(request, response, conversation)
            yield events.done(response)
        except APIError as exc:
            self.core.metrics.observe_error(int(exc.status_code))
            yield events.error(exc)
        except Exception as exc:
            logger.exception("error while streaming a response")
            error = internal_error(exc)
            self.core.metrics.observe_error(int(error.status_code))
            yield events.error(error)

    async def _deltas(self, context: ChatContext, events: ResponseEvents):
        """``(events, choice state)`` per engine output of the one choice."""
        tool_plan, core = context.tool_plan, self.core
        parser = self.chat.tools.parser(tool_plan) if tool_plan is not None else None
        outputs = core.generation.run_choices(context.jobs, context.plan, context.deadline)
        async with aclosing(outputs):
            async for delta, state in outputs:
                content, calls = delta.text, None
                if tool_plan is not None:
                    content, calls = parse_delta(
                        parser, tool_plan, delta.text, delta.token_ids, context.prompts[0],
                        finished=delta.finish_reason is not None,
                    )
                batch = events.tool_calls(calls) if calls else []
                if content:
                    logprobs = self.chat.logprobs(context.num_top, delta.token_ids, delta.logprobs)
                    mixture = core.mixture_report(state, context.plan, delta)
                    batch += events.text(content, logprobs.content if logprobs else [], mixture)
                yield batch, state


def _shell(request: ResponsesRequest, context: ChatContext) -> ResponsesResponse:
    """The response as created: what it echoes of the request, in progress, no output yet."""
    choice = request.tool_choice
    return ResponsesResponse(
        id=new_item_id("resp"),
        created_at=context.created,
        status="in_progress",
        instructions=request.instructions,
        max_output_tokens=request.max_output_tokens,
        metadata=request.metadata,
        model=context.model,
        parallel_tool_calls=request.parallel_tool_calls is not False,
        previous_response_id=request.previous_response_id,
        temperature=context.sampling.arguments["temperature"],
        text=request.text or TextConfig(),
        tool_choice=choice if isinstance(choice, str | ToolChoiceFunction) else "auto",
        tools=list(request.tools or []),
        top_logprobs=request.top_logprobs,
        top_p=context.sampling.arguments["top_p"],
        user=request.user,
    )


def _output_items(message, logprobs, status: str, request: ResponsesRequest) -> list:
    """The chat choice's message as output items: its text (if any, or no call), then its calls."""
    calls = message.tool_calls[:1] if request.parallel_tool_calls is False else message.tool_calls
    items: list = []
    if message.content or not calls:
        wanted = LOGPROBS_INCLUDE in (request.include or [])
        text = OutputText(text=message.content or "",
                          logprobs=logprobs.content if wanted and logprobs else [])
        items.append(OutputMessage(id=new_item_id("msg"), status=status, content=[text]))
    items += [
        FunctionToolCall(id=new_item_id("fc"), call_id=call.id, name=call.function.name,
                         arguments=call.function.arguments, status=status)
        for call in calls
    ]
    return items


def _usage(usage: UsageInfo) -> ResponseUsage:
    return ResponseUsage(
        input_tokens=usage.prompt_tokens,
        output_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
    )
