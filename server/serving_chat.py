"""``POST /v1/chat/completions``: messages -> chat template -> engine requests.

With ``tools`` (``tools.py``), the template renders them, vLLM's tool parser
constrains the output to its call format and turns the text into tool calls.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from gatemix.server.chat_template import ChatRenderer, message_dicts
from gatemix.server.choices import ChoiceState
from gatemix.server.errors import bad_request
from gatemix.server.limits import Ticket
from gatemix.server.logprobs import chat_logprobs, prompt_logprobs
from gatemix.server.protocol import (
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    ChatDelta,
    ChatResponseMessage,
)
from gatemix.server.request_context import RequestContext, new_response_id
from gatemix.server.serving import ServingEngine
from gatemix.server.sse import sse_stream
from gatemix.server.tools import ToolCalling, ToolPlan, finish_reason, parse_choice, parse_delta


@dataclass(frozen=True, kw_only=True)
class ChatContext(RequestContext):
    request: ChatCompletionRequest
    num_top: int | None  # top logprobs per generated token; None: no logprobs
    tool_plan: ToolPlan | None  # with tools: the template's tools, the grammar, the parser


class OpenAIServingChat:
    def __init__(self, *, core: ServingEngine, renderer: ChatRenderer, tools: ToolCalling) -> None:
        self.core = core
        self.renderer = renderer
        self.tools = tools

    def render(
        self, messages: list[dict], add_generation_prompt: bool, tools: list[dict] | None
    ) -> list[int]:
        """The prompt's token ids (the template places the special tokens it wants)."""
        text = self.renderer.render(messages, add_generation_prompt, tools)
        return self.core.tokenizer(text, add_special_tokens=False).input_ids

    async def create_chat_completion(
        self, request: ChatCompletionRequest, ticket: Ticket
    ) -> ChatCompletionResponse | AsyncIterator[str]:
        """Validate and plan eagerly (errors become HTTP errors); stream or collect after."""
        context = self.context(request, ticket)
        if request.stream:
            return sse_stream(self._stream(context), self.core.metrics)
        states = await self.core.generation.collect_choices(
            context.jobs, context.plan, context.deadline
        )
        choices = [self.choice(context, state) for state in states]
        prompt_ids = context.prompts[0]
        return context.response(
            ChatCompletionResponse,
            choices,
            context.usage(states),
            mixture=choices[0].mixture,
            prompt_logprobs=prompt_logprobs(
                prompt_ids, states[0].prompt_logprobs, request.prompt_logprobs
            ),
        )

    def context(self, request: ChatCompletionRequest, ticket: Ticket) -> ChatContext:
        """Every check, the rendered prompt and the admitted jobs (``/v1/responses`` too)."""
        core = self.core
        deadline = core.deadline()
        plan = core.models.plan(request.model, request.mixture)
        if request.top_logprobs is not None and not request.logprobs:
            raise bad_request("top_logprobs requires logprobs to be true", "top_logprobs")
        num_top = (request.top_logprobs or 0) if request.logprobs else None
        sampling = core.check_request(request, chat=True, logprobs=num_top)
        messages = message_dicts(request.messages, self.tools.supported)
        tool_plan = self.tools.plan(request, messages)
        changes: dict = {"prompt_logprobs": request.prompt_logprobs}
        if tool_plan is not None:
            changes["structured_outputs"] = tool_plan.structured_outputs
            changes["skip_special_tokens"] = tool_plan.skip_special_tokens
        sampling = sampling.replace(**changes)
        prompt_ids = self.render(
            messages, request.add_generation_prompt, tool_plan.tool_dicts if tool_plan else None
        )
        use_completion_tokens = request.max_completion_tokens is not None
        jobs = core.make_jobs(
            request,
            [prompt_ids],
            sampling,
            ticket,
            max_tokens_param="max_completion_tokens" if use_completion_tokens else "max_tokens",
            prompt_param="messages",
        )
        return ChatContext(
            request=request,
            response_id=new_response_id("chatcmpl"),
            plan=plan,
            sampling=sampling,
            prompts=[prompt_ids],
            jobs=jobs,
            deadline=deadline,
            num_top=num_top,
            tool_plan=tool_plan,
        )

    def choice(self, context: ChatContext, state: ChoiceState) -> ChatCompletionChoice:
        """A whole choice: its text parsed into content and tool calls, logprobs, gate report."""
        tool_plan = context.tool_plan
        content, tool_calls = state.text, []
        if tool_plan is not None:
            parser = self.tools.parser(tool_plan)
            content, tool_calls = parse_choice(parser, tool_plan, state.text, state.token_ids)
        return ChatCompletionChoice(
            finish_reason=finish_reason(tool_plan, bool(tool_calls), state.finish_reason),
            index=state.index,
            logprobs=self.logprobs(context.num_top, state.token_ids, state.logprobs),
            message=ChatResponseMessage(content=content, tool_calls=tool_calls),
            mixture=self.core.mixture_report(state, context.plan),
        )

    def logprobs(self, num_top: int | None, token_ids: list[int], positions: list[dict] | None):
        if num_top is None:
            return None
        return chat_logprobs(token_ids, positions or [], num_top, self.core.tokenizer)

    async def _stream(self, context: ChatContext) -> AsyncIterator[str]:
        tool_plan, jobs = context.tool_plan, context.jobs
        # Like OpenAI: each choice opens with the assistant role and empty content.
        for job in jobs:
            opening = ChatDelta(role="assistant", content="")
            yield self._chunk(context, [ChatCompletionStreamChoice(delta=opening, index=job.index)])
        parsers = {job.index: self.tools.parser(tool_plan) for job in jobs} if tool_plan else {}
        called: set[int] = set()
        states: dict[int, ChoiceState] = {}
        generation = self.core.generation
        async for delta, state in generation.run_choices(jobs, context.plan, context.deadline):
            states[state.index] = state
            if not (delta.token_ids or delta.finish_reason):
                continue
            content, calls = delta.text, None
            if tool_plan is not None:
                content, calls = parse_delta(
                    parsers[state.index],
                    tool_plan,
                    delta.text,
                    delta.token_ids,
                    context.prompts[0],
                    finished=delta.finish_reason is not None,
                )
                if calls:
                    called.add(state.index)
            choice = ChatCompletionStreamChoice(
                delta=ChatDelta(content=content, tool_calls=calls or None),
                finish_reason=finish_reason(tool_plan, state.index in called, delta.finish_reason),
                index=state.index,
                logprobs=self.logprobs(context.num_top, delta.token_ids, delta.logprobs),
                mixture=self.core.mixture_report(state, context.plan, delta),
            )
            yield self._chunk(context, [choice])
        if context.include_usage:
            yield self._chunk(context, [], usage=context.usage(context.in_order(states)))

    @staticmethod
    def _chunk(context, choices: list, usage=None) -> str:
        return context.chunk_json(ChatCompletionChunk, choices, usage)
