"""``POST /v1/completions``: prompts -> engine requests -> a response or an SSE stream."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from gatemix.server.choices import ChoiceDelta, ChoiceState
from gatemix.server.errors import bad_request
from gatemix.server.limits import Deadline, Ticket
from gatemix.server.logprobs import completion_logprobs, prompt_logprobs
from gatemix.server.protocol import (
    CompletionChoice,
    CompletionLogProbs,
    CompletionRequest,
    CompletionResponse,
)
from gatemix.server.served_models import GatePlan
from gatemix.server.serving import ServingEngine, new_response_id


class OpenAIServingCompletion:
    def __init__(self, *, core: ServingEngine) -> None:
        self.core = core

    async def create_completion(
        self, request: CompletionRequest, ticket: Ticket
    ) -> CompletionResponse | AsyncIterator[str]:
        """Validate and plan eagerly (errors become HTTP errors); stream or collect after."""
        core = self.core
        deadline = core.deadline()
        plan = core.models.plan(request.model, request.mixture)
        sampling = core.check_request(request, chat=False, logprobs=request.logprobs)
        prompts, prompt_texts = self._tokenize(request.prompt, request.add_special_tokens)
        # The echoed prompt's logprobs and the requested prompt_logprobs come from one pass.
        echo_logprobs = request.logprobs if request.echo and request.logprobs is not None else None
        wanted = [k for k in (echo_logprobs, request.prompt_logprobs) if k is not None]
        sampling["prompt_logprobs"] = max(wanted) if wanted else None
        jobs = core.make_jobs(
            prompts,
            n=request.n,
            max_tokens=request.max_tokens,
            max_tokens_param="max_tokens",
            prompt_param="prompt",
            seed=request.seed,
            sampling=sampling,
            ticket=ticket,
        )
        echo_texts = [prompt_texts[job.index // request.n] if request.echo else "" for job in jobs]
        response_id, created = new_response_id("cmpl"), int(time.time())
        if request.stream:
            events = self._stream(
                request, plan, jobs, deadline, prompts, echo_texts, response_id, created
            )
            return core.sse_stream(events)
        states = await core.collect_choices(jobs, plan, deadline)
        choices = [
            self._choice(request, plan, state, None, echo_texts[i], first_part=True)
            for i, state in enumerate(states)
        ]
        return CompletionResponse(
            id=response_id,
            choices=choices,
            created=created,
            model=plan.model,
            usage=core.usage(prompts, states),
            mixture=choices[0].mixture,
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
        request: CompletionRequest,
        plan: GatePlan,
        state: ChoiceState,
        delta: ChoiceDelta | None,
        echo_text: str,
        first_part: bool,
    ) -> CompletionChoice:
        """A whole choice (``delta`` None), or a stream chunk's part of it.

        ``echo_text`` is the choice's echoed prompt ("" without echo). The first part
        (the whole choice, or a stream's first chunk) carries it and the prompt's ids.
        """
        text = state.text if delta is None else delta.text
        token_ids = state.token_ids if delta is None else delta.token_ids
        positions = state.logprobs if delta is None else (delta.logprobs or [])
        logprobs = None
        if request.logprobs is not None:
            core, k = self.core, request.logprobs
            offset = len(echo_text) + len(state.text) - len(text)
            logprobs = CompletionLogProbs()
            if request.echo and first_part:
                logprobs = completion_logprobs(
                    state.prompt_ids,
                    state.prompt_logprobs or [None] * len(state.prompt_ids),
                    k,
                    core.tokenizer,
                )
            generated = completion_logprobs(token_ids, positions, k, core.tokenizer, offset)
            for name in ("text_offset", "token_logprobs", "tokens", "top_logprobs"):
                getattr(logprobs, name).extend(getattr(generated, name))
        return CompletionChoice(
            finish_reason=state.finish_reason if delta is None else delta.finish_reason,
            index=state.index,
            logprobs=logprobs,
            text=(echo_text if first_part else "") + text,
            mixture=self.core.mixture_report(state, plan, delta),
            prompt_logprobs=prompt_logprobs(
                state.prompt_ids, state.prompt_logprobs, request.prompt_logprobs
            )
            if delta is None
            else None,
            prompt_token_ids=state.prompt_ids if request.return_token_ids and first_part else None,
            token_ids=list(token_ids) if request.return_token_ids else None,
        )

    async def _stream(
        self,
        request: CompletionRequest,
        plan: GatePlan,
        jobs,
        deadline: Deadline,
        prompts: list[list[int]],
        echo_texts: list[str],
        response_id: str,
        created: int,
    ) -> AsyncIterator[str]:
        states: dict[int, ChoiceState] = {}
        async for delta, state in self.core.run_choices(jobs, plan, deadline):
            first = state.index not in states
            states[state.index] = state
            if not (delta.token_ids or delta.finish_reason or first):
                continue
            # The echoed prompt (and its logprobs) goes out once, with the choice's first chunk.
            choice = self._choice(
                request, plan, state, delta, echo_texts[state.index], first_part=first
            )
            chunk = CompletionResponse(
                id=response_id, choices=[choice], created=created, model=plan.model
            )
            yield chunk.model_dump_json()
        if request.stream_options and request.stream_options.include_usage:
            ordered = [states[job.index] for job in jobs if job.index in states]
            usage = self.core.usage(prompts, ordered)
            chunk = CompletionResponse(
                id=response_id, choices=[], created=created, model=plan.model, usage=usage
            )
            yield chunk.model_dump_json()
