"""``POST /v1/chat/completions``: messages -> chat template -> engine requests.

With ``tools`` (``tools.py``), the template renders them, vLLM's tool parser
constrains the output to its call format and turns the text into tool calls.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from gatemix.server.chat_template import ChatRenderer, message_dicts
from gatemix.server.choices import ChoiceState
from gatemix.server.errors import bad_request
from gatemix.server.limits import Deadline, Ticket
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
from gatemix.server.served_models import GatePlan
from gatemix.server.serving import ServingEngine, new_response_id
from gatemix.server.tools import ToolCalling, ToolPlan, finish_reason, parse_choice, parse_delta


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
        core = self.core
        deadline = core.deadline()
        plan = core.models.plan(request.model, request.mixture)
        if request.top_logprobs is not None and not request.logprobs:
            raise bad_request("top_logprobs requires logprobs to be true", "top_logprobs")
        num_top = (request.top_logprobs or 0) if request.logprobs else None
        sampling = core.check_request(request, chat=True, logprobs=num_top)
        messages = message_dicts(request.messages, self.tools.supported)
        tool_plan = self.tools.plan(request, messages)
        if tool_plan is not None:
            sampling["structured_outputs"] = tool_plan.structured_outputs
            sampling["skip_special_tokens"] = tool_plan.skip_special_tokens
        sampling["prompt_logprobs"] = request.prompt_logprobs
        prompt_ids = self.render(
            messages, request.add_generation_prompt, tool_plan.tool_dicts if tool_plan else None
        )
        use_completion_tokens = request.max_completion_tokens is not None
        jobs = core.make_jobs(
            [prompt_ids],
            n=request.n,
            max_tokens=request.max_completion_tokens
            if use_completion_tokens
            else request.max_tokens,
            max_tokens_param="max_completion_tokens" if use_completion_tokens else "max_tokens",
            prompt_param="messages",
            seed=request.seed,
            sampling=sampling,
            ticket=ticket,
        )
        response_id, created = new_response_id("chatcmpl"), int(time.time())
        if request.stream:
            events = self._stream(
                request, plan, tool_plan, jobs, deadline, prompt_ids, response_id, created
            )
            return core.sse_stream(events)
        states = await core.collect_choices(jobs, plan, deadline)
        choices = [self._choice(state, plan, num_top, tool_plan) for state in states]
        return ChatCompletionResponse(
            id=response_id,
            choices=choices,
            created=created,
            model=plan.model,
            usage=core.usage([prompt_ids], states),
            mixture=choices[0].mixture,
            prompt_logprobs=prompt_logprobs(
                prompt_ids, states[0].prompt_logprobs, request.prompt_logprobs
            ),
        )

    def _choice(
        self, state: ChoiceState, plan: GatePlan, num_top: int | None, tool_plan: ToolPlan | None
    ) -> ChatCompletionChoice:
        content, tool_calls = state.text, []
        if tool_plan is not None:
            parser = self.tools.parser(tool_plan)
            content, tool_calls = parse_choice(parser, tool_plan, state.text, state.token_ids)
        return ChatCompletionChoice(
            finish_reason=finish_reason(tool_plan, bool(tool_calls), state.finish_reason),
            index=state.index,
            logprobs=self._logprobs(num_top, state.token_ids, state.logprobs),
            message=ChatResponseMessage(content=content, tool_calls=tool_calls),
            mixture=self.core.mixture_report(state, plan),
        )

    def _logprobs(self, num_top: int | None, token_ids: list[int], positions: list[dict] | None):
        if num_top is None:
            return None
        return chat_logprobs(token_ids, positions or [], num_top, self.core.tokenizer)

    async def _stream(
        self,
        request: ChatCompletionRequest,
        plan: GatePlan,
        tool_plan: ToolPlan | None,
        jobs,
        deadline: Deadline,
        prompt_ids: list[int],
        response_id: str,
        created: int,
    ) -> AsyncIterator[str]:
        num_top = (request.top_logprobs or 0) if request.logprobs else None

        def chunk(choices, usage=None) -> str:
            return ChatCompletionChunk(
                id=response_id, choices=choices, created=created, model=plan.model, usage=usage
            ).model_dump_json()

        # Like OpenAI: each choice opens with the assistant role and empty content.
        for job in jobs:
            yield chunk(
                [
                    ChatCompletionStreamChoice(
                        delta=ChatDelta(role="assistant", content=""), index=job.index
                    )
                ]
            )
        parsers = {job.index: self.tools.parser(tool_plan) for job in jobs} if tool_plan else {}
        called: set[int] = set()
        states: dict[int, ChoiceState] = {}
        async for delta, state in self.core.run_choices(jobs, plan, deadline):
            states[state.index] = state
            if not (delta.token_ids or delta.finish_reason):
                continue
            content, calls = delta.text, None
            if tool_plan is not None:
                content, calls = parse_delta(
                    parsers[state.index], tool_plan, delta.text, delta.token_ids, prompt_ids,
                    finished=delta.finish_reason is not None,
                )
                if calls:
                    called.add(state.index)
            choice = ChatCompletionStreamChoice(
                delta=ChatDelta(content=content, tool_calls=calls or None),
                finish_reason=finish_reason(
                    tool_plan, state.index in called, delta.finish_reason
                ),
                index=state.index,
                logprobs=self._logprobs(num_top, delta.token_ids, delta.logprobs),
                mixture=self.core.mixture_report(state, plan, delta),
            )
            yield chunk([choice])
        if request.stream_options and request.stream_options.include_usage:
            ordered = [states[job.index] for job in jobs if job.index in states]
            yield chunk([], usage=self.core.usage([prompt_ids], ordered))
