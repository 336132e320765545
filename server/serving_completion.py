"""``POST /v1/completions``: prompts -> engine requests -> a response or an SSE stream."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from gatemix.server.choices import ChoiceDelta, ChoiceState
from gatemix.server.errors import bad_request
from gatemix.server.limits import Ticket
from gatemix.server.logprobs import completion_logprobs, prompt_logprobs
from gatemix.server.protocol import (
    CompletionChoice,
    CompletionLogProbs,
    CompletionRequest,
    CompletionResponse,
)
from gatemix.server.request_context import RequestContext, new_response_id
from gatemix.server.serving import ServingEngine
from gatemix.server.sse import sse_stream


@dataclass(frozen=True, kw_only=True)
class CompletionContext(RequestContext):
    request: CompletionRequest
    echo_texts: list[str]  # per choice: its echoed prompt ("" without echo)


class OpenAIServingCompletion:
    def __init__(self, *, core: ServingEngine) -> None:
        self.core = core

    async def create_completion(
        self, request: CompletionRequest, ticket: Ticket
    ) -> CompletionResponse | AsyncIterator[str]:
        """Validate and plan eagerly (errors become HTTP errors); stream or collect after."""
        context = self._context(request, ticket)
        if request.stream:
            return sse_stream(self._stream(context), self.core.metrics)
        states = await self.core.generation.collect_choices(
            context.jobs, context.plan, context.deadline
        )
        choices = [self._choice(context, state, None, first_part=True) for state in states]
        return context.response(
            CompletionResponse, choices, context.usage(states), mixture=choices[0].mixture
        )

    def _context(self, request: CompletionRequest, ticket: Ticket) -> CompletionContext:
        core = self.core
        deadline = core.deadline()
        plan = core.models.plan(request.model, request.mixture)
        sampling = core.check_request(request, chat=False, logprobs=request.logprobs)
        prompts, prompt_texts = self._tokenize(request.prompt, request.add_special_tokens)
        # The echoed prompt's logprobs and the requested prompt_logprobs come from one pass.
        echo_logprobs = request.logprobs if request.echo and request.logprobs is not None else None
        wanted = [k for k in (echo_logprobs, request.prompt_logprobs) if k is not None]
        sampling = sampling.replace(prompt_logprobs=max(wanted) if wanted else None)
        jobs = core.make_jobs(
            request, prompts, sampling, ticket, max_tokens_param="max_tokens", prompt_param="prompt"
        )
        return CompletionContext(
            request=request,
            response_id=new_response_id("cmpl"),
            plan=plan,
            sampling=sampling,
            prompts=prompts,
            jobs=jobs,
            deadline=deadline,
            echo_texts=[
                prompt_texts[job.index // request.n] if request.echo else "" for job in jobs
            ],
        )

    def _tokenize(self, prompt, add_special_tokens: bool) -> tuple[list[list[int]], list[str]]:
        """Token ids and text of each prompt (text: as given, or decoded ids)."""
        tokenizer = self.core.tokenizer
        is_text = isinstance(prompt, str) or isinstance(prompt[0], str)
        single = isinstance(prompt, str) or isinstance(prompt[0], int)
        items = [prompt] if single else list(prompt)
        limit = self.core.settings.max_prompts
        if len(items) > limit:  # before any tokenizing
            raise bad_request(f"{len(items)} prompts; the limit is {limit}", "prompt")
        if is_text:
            prompts = [
                tokenizer(text, add_special_tokens=add_special_tokens).input_ids for text in items
            ]
            return prompts, items
        prompts = [list(ids) for ids in items]
        for ids in prompts:
            self.core.check_token_ids(ids, "prompt")
        return prompts, [tokenizer.decode(ids) for ids in prompts]

    def _choice(
        self,
        context: CompletionContext,
        state: ChoiceState,
        delta: ChoiceDelta | None,
        first_part: bool,
    ) -> CompletionChoice:
        """A whole choice (``delta`` None), or a stream chunk's part of it.

        The first part (the whole choice, or a stream's first chunk) carries the echoed
        prompt and the prompt's ids.
        """
        request, echo_text = context.request, context.echo_texts[state.index]
        text = state.text if delta is None else delta.text
        token_ids = state.token_ids if delta is None else delta.token_ids
        return CompletionChoice(
            finish_reason=state.finish_reason if delta is None else delta.finish_reason,
            index=state.index,
            logprobs=self._logprobs(context, state, delta, first_part),
            text=(echo_text if first_part else "") + text,
            mixture=self.core.mixture_report(state, context.plan, delta),
            prompt_logprobs=prompt_logprobs(
                state.prompt_ids, state.prompt_logprobs, request.prompt_logprobs
            )
            if delta is None
            else None,
            prompt_token_ids=state.prompt_ids if request.return_token_ids and first_part else None,
            token_ids=list(token_ids) if request.return_token_ids else None,
        )

    def _logprobs(
        self,
        context: CompletionContext,
        state: ChoiceState,
        delta: ChoiceDelta | None,
        first_part: bool,
    ) -> CompletionLogProbs | None:
        """The part's logprobs: the echoed prompt's (first part only), then the generated ones."""
        request, tokenizer = context.request, self.core.tokenizer
        if request.logprobs is None:
            return None
        k = request.logprobs
        text = state.text if delta is None else delta.text
        token_ids = state.token_ids if delta is None else delta.token_ids
        positions = state.logprobs if delta is None else (delta.logprobs or [])
        offset = len(context.echo_texts[state.index]) + len(state.text) - len(text)
        logprobs = CompletionLogProbs()
        if request.echo and first_part:
            prompt_positions = state.prompt_logprobs or [None] * len(state.prompt_ids)
            logprobs = completion_logprobs(state.prompt_ids, prompt_positions, k, tokenizer,
                                           as_token_ids=request.return_tokens_as_token_ids)
        generated = completion_logprobs(token_ids, positions, k, tokenizer, offset,
                                        as_token_ids=request.return_tokens_as_token_ids)
        for name in ("text_offset", "token_logprobs", "tokens", "top_logprobs"):
            getattr(logprobs, name).extend(getattr(generated, name))
        return logprobs

    async def _stream(self, context: CompletionContext) -> AsyncIterator[str]:
        states: dict[int, ChoiceState] = {}
        generation = self.core.generation
        async for delta, state in generation.run_choices(
            context.jobs, context.plan, context.deadline
        ):
            first = state.index not in states
            states[state.index] = state
            if not (delta.token_ids or delta.finish_reason or first):
                continue
            # The echoed prompt (and its logprobs) goes out once, with the choice's first chunk.
            choice = self._choice(context, state, delta, first_part=first)
            yield self._chunk(context, [choice])
        if context.include_usage:
            yield self._chunk(context, [], usage=context.usage(context.in_order(states)))

    @staticmethod
    def _chunk(context, choices: list, usage=None) -> str:
        return context.chunk_json(CompletionResponse, choices, usage)
