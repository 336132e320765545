"""``POST /v1/chat/completions``: messages -> chat template -> engine requests."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from gatemix.server.chat_template import render_chat
from gatemix.server.choices import ChoiceState
from gatemix.server.errors import bad_request
from gatemix.server.logprobs import chat_logprobs
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


class OpenAIServingChat:
    def __init__(self, *, core: ServingEngine) -> None:
        self.core = core

    async def create_chat_completion(
        self, request: ChatCompletionRequest
    ) -> ChatCompletionResponse | AsyncIterator[str]:
        core = self.core
        plan = core.models.plan(request.model, request.mixture)
        if request.top_logprobs is not None and not request.logprobs:
            raise bad_request("top_logprobs requires logprobs to be true", "top_logprobs")
        num_top = (request.top_logprobs or 0) if request.logprobs else None
        stop = core.check_request_limits(n=request.n, stop=request.stop, logprobs=num_top)
        prompt_text = render_chat(core.tokenizer, request.messages, request.add_generation_prompt)
        # The template already placed the special tokens (BOS) it wants.
        prompt_ids = core.tokenizer(prompt_text, add_special_tokens=False).input_ids
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
            temperature=request.temperature,
            top_p=request.top_p,
            top_k=request.top_k,
            presence_penalty=request.presence_penalty,
            frequency_penalty=request.frequency_penalty,
            repetition_penalty=request.repetition_penalty,
            stop=stop,
            min_tokens=request.min_tokens,
            ignore_eos=request.ignore_eos,
            logprobs=num_top,
        )
        response_id, created = new_response_id("chatcmpl"), int(time.time())
        if request.stream:
            return core.sse_stream(
                self._stream(request, plan, jobs, [prompt_ids], response_id, created)
            )
        states = await core.collect_choices(jobs, plan)
        choices = [
            ChatCompletionChoice(
                finish_reason=state.finish_reason,
                index=state.index,
                logprobs=self._logprobs(num_top, state.token_ids, state.logprobs),
                message=ChatResponseMessage(content=state.text),
                mixture=core.mixture_report(state, plan),
            )
            for state in states
        ]
        return ChatCompletionResponse(
            id=response_id,
            choices=choices,
            created=created,
            model=plan.model,
            usage=core.usage([prompt_ids], states),
            mixture=choices[0].mixture,
        )

    def _logprobs(self, num_top: int | None, token_ids: list[int], positions: list[dict] | None):
        if num_top is None:
            return None
        return chat_logprobs(token_ids, positions or [], num_top, self.core.tokenizer)

    async def _stream(
        self,
        request: ChatCompletionRequest,
        plan: GatePlan,
        jobs,
        prompts: list[list[int]],
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
        states: dict[int, ChoiceState] = {}
        async for delta, state in self.core.run_choices(jobs, plan):
            states[state.index] = state
            if not (delta.token_ids or delta.finish_reason):
                continue
            choice = ChatCompletionStreamChoice(
                delta=ChatDelta(content=delta.text),
                finish_reason=delta.finish_reason,
                index=state.index,
                logprobs=self._logprobs(num_top, delta.token_ids, delta.logprobs),
                mixture=self.core.mixture_report(state, plan, delta),
            )
            yield chunk([choice])
        if request.stream_options and request.stream_options.include_usage:
            ordered = [states[job.index] for job in jobs if job.index in states]
            yield chunk([], usage=self.core.usage(prompts, ordered))
