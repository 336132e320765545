"""Shared serving logic: request checks and limits, engine requests per choice, gate reports.

Each choice of a response is its own engine request (vLLM's ``n > 1`` fan-out
would copy one gate-trace id to every child), with its own request id, trace
id and, when the request has a ``seed``, ``seed + i`` for choice ``i``. The
choices run concurrently and their outputs are merged as they arrive.

Outputs are always requested as deltas (``RequestOutputKind.DELTA``), so the
streaming and the non-streaming paths see the same engine outputs; the latter
just accumulates them.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator

import anyio

from gatemix.server.choices import (
    ChoiceDelta,
    ChoiceJob,
    ChoiceState,
    ChoiceTiming,
    merge_streams,
)
from gatemix.server.errors import APIError, bad_request, engine_dead, internal_error
from gatemix.server.limits import Deadline, Ticket
from gatemix.server.protocol import MixtureReport, UsageInfo
from gatemix.server.sampling import (
    check_token_ids,
    refuse_unsupported,
    sampling_kwargs,
    structured_param,
    verify_sampling,
)
from gatemix.server.served_models import GatePlan, ServedModels
from gatemix.server.settings import Settings

logger = logging.getLogger(__name__)


def sse(payload: str | dict) -> str:
    """One server-sent event."""
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def new_response_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def finish_reason(vllm_reason: str | None) -> str | None:
    """OpenAI's reasons: "length" when max_tokens ran out, else "stop" (EOS or a stop string)."""
    if vllm_reason is None:
        return None
    return "length" if vllm_reason == "length" else "stop"


class ServingEngine:
    """The engine side shared by the completions and chat endpoints."""

    def __init__(
        self,
        *,
        engine,
        tokenizer,
        models: ServedModels,
        receiver,
        metrics,
        settings: Settings,
        vocab_size: int,
        max_model_len: int,
    ) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.models = models
        self.receiver = receiver  # GateTraceReceiver, or None for a plain single-model folder
        self.metrics = metrics
        self.settings = settings
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len  # the engine's context, prompt and completion together
        self.waiting = 0  # engine requests submitted, no token yet
        self.running = 0  # engine requests producing tokens
        self.aborted = 0  # engine requests aborted (client gone, or an error)
        self.gates_in_flight: Counter[str] = Counter()  # gate version -> unfinished engine requests (> 0)

    def gate_versions_in_flight(self) -> list[str]:
        """The gates unfinished requests were promised; a gate swap keeps them loaded."""
        return sorted(self.gates_in_flight)

    # ------------------------------------------------------------ validation

    def check_request(self, request, *, chat: bool, logprobs: int | None) -> dict:
        """Every check that depends on the settings or the vocabulary, before any engine work.

        Returns the request's vLLM sampling arguments (``sampling.sampling_kwargs``).
        """
        settings = self.settings
        refuse_unsupported(request, chat=chat)
        if request.n > settings.max_n:
            raise bad_request(f"n is {request.n}; this server allows at most {settings.max_n}", "n")
        stop = request.stop
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > settings.max_stop:
            raise bad_request(
                f"{len(stops)} stop sequences; this server allows at most {settings.max_stop}",
                "stop",
            )
        for name, value in (("logprobs", logprobs), ("prompt_logprobs", request.prompt_logprobs)):
            if value is not None and value > settings.max_logprobs:
                raise bad_request(
                    f"{name} is {value}; this server allows at most {settings.max_logprobs}", name
                )
        if request.prompt_logprobs is not None and request.stream:
            raise bad_request("prompt_logprobs are not available when streaming", "prompt_logprobs")
        sampling = sampling_kwargs(request, stop=stops, logprobs=logprobs, vocab_size=self.vocab_size)
        verify_sampling(self.engine, sampling, structured_param(request))
        return sampling

    def check_token_ids(self, token_ids: list[int], param: str) -> None:
        check_token_ids(token_ids, self.vocab_size, param)

    def engine_max_tokens(
        self, prompt_len: int, requested: int | None, param: str, prompt_param: str, default_cap: int
    ) -> tuple[int, bool]:
        """``(max_tokens for the engine, drop the output)`` after the context checks.

        ``requested`` None means "the rest of the context", within ``default_cap`` (the
        request's share of the output budget); 0 means "score the prompt only": the
        engine cannot generate 0 tokens, so it makes one that is dropped.
        """
        context = self.max_model_len
        if prompt_len == 0:
            raise bad_request("the prompt is empty", prompt_param)
        if requested is None:
            requested = max(min(context - prompt_len, default_cap), 1)
        limit = self.settings.max_tokens_limit
        if limit is not None and requested > limit:
            raise bad_request(f"{param} is {requested}; this server allows at most {limit}", param)
        if prompt_len + max(requested, 1) > context:
            raise bad_request(
                f"This model's maximum context length is {context} tokens. However, you requested "
                f"{prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} for the "
                "completion). Please reduce the prompt or the completion length.",
                prompt_param if prompt_len >= context else param,
                code="context_length_exceeded",
            )
        return max(requested, 1), requested == 0

    def sampling_params(
        self, *, seed: int | None, choice: int, max_tokens: int, drop_output: bool, **kwargs
    ):
        """vLLM ``SamplingParams`` for one choice; vLLM's own checks become 400s."""
        from vllm.exceptions import VLLMClientError
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        if drop_output:
            kwargs["min_tokens"] = 0
        try:
            return SamplingParams(
                n=1,
                seed=None if seed is None else seed + choice,
                max_tokens=max_tokens,
                output_kind=RequestOutputKind.DELTA,
                **kwargs,
            )
        except (ValueError, VLLMClientError) as exc:  # vLLM's own range checks
            raise bad_request(str(exc), getattr(exc, "parameter", None)) from exc

    def make_jobs(
        self,
        prompts: list[list[int]],
        *,
        n: int,
        max_tokens: int | None,
        max_tokens_param: str,
        prompt_param: str,
        seed: int | None,
        sampling: dict,
        ticket: Ticket,
    ) -> list[ChoiceJob]:
        """``n`` engine requests per prompt; choice ``p * n + i`` is prompt p's i-th.

        The request's output, prompts x n x max_tokens, is capped by the settings'
        ``max_output_tokens``; its choices are admitted (or refused with a 429) last.
        """
        budget = self.settings.max_output_tokens
        share = max(budget // (len(prompts) * n), 1)
        lengths = [
            self.engine_max_tokens(len(ids), max_tokens, max_tokens_param, prompt_param, share)
            for ids in prompts
        ]
        total = n * sum(engine_max for engine_max, _ in lengths)
        if total > budget:
            raise bad_request(
                f"the request may generate {total} tokens (prompts x n x {max_tokens_param}); "
                f"this server allows at most {budget}",
                max_tokens_param,
            )
        response_key = uuid.uuid4().hex
        jobs = []
        for p, prompt_ids in enumerate(prompts):
            engine_max, drop = lengths[p]
            for i in range(n):
                params = self.sampling_params(
                    seed=seed, choice=i, max_tokens=engine_max, drop_output=drop, **sampling
                )
                index = p * n + i
                jobs.append(
                    ChoiceJob(index, prompt_ids, params, drop, f"gatemix-{response_key}-{index}")
                )
        ticket.admit(len(jobs))
        return jobs

    def deadline(self) -> Deadline:
        return Deadline(self.settings.request_timeout_s)

    # ------------------------------------------------------------ generation

    async def run_choices(
        self, jobs: list[ChoiceJob], plan: GatePlan, deadline: Deadline
    ) -> AsyncIterator[tuple[ChoiceDelta, ChoiceState]]:
        """All choices' deltas, merged; closing the iterator aborts unfinished engine requests,
        and so does the deadline passing (then a 504 is raised)."""
        streams = [self._run_choice(job, plan) for job in jobs]
        async for item in merge_streams(streams, deadline):
            yield item

    async def collect_choices(
        self, jobs: list[ChoiceJob], plan: GatePlan, deadline: Deadline
    ) -> list[ChoiceState]:
        states: dict[int, ChoiceState] = {}
        async for _delta, state in self.run_choices(jobs, plan, deadline):
            states[state.index] = state
        return [states[job.index] for job in jobs]

    async def _run_choice(
        self, job: ChoiceJob, plan: GatePlan
    ) -> AsyncIterator[tuple[ChoiceDelta, ChoiceState]]:
        state = ChoiceState(index=job.index, prompt_ids=job.prompt_ids)
        trace_id = self.receiver.new_trace_id() if self.receiver is not None else None
        params = job.params
        if trace_id is not None:
            from gatemix.engine.request_gates import gate_request_args

            params = params.clone()
            params.extra_args = gate_request_args(
                pinned_weights=plan.pinned_weights,
                expert_mask=plan.expert_mask,
                trace_id=trace_id,
                trace_to=self.receiver.address,
                gate_version=plan.gate_version,
            )
        timing = ChoiceTiming(arrival=time.monotonic())
        finished, started = False, False
        self._set_queue(waiting=+1)
        gate_version = plan.gate_version if trace_id is not None else None
        if gate_version is not None:
            self.gates_in_flight[gate_version] += 1
        try:
            outputs = self.engine.generate(
                {"prompt_token_ids": job.prompt_ids}, params, job.request_id
            )
            async for output in _engine_errors(outputs):
                if not started:
                    started = True
                    self._set_queue(waiting=-1, running=+1)
                if output.prompt_logprobs is not None and state.prompt_logprobs is None:
                    state.prompt_logprobs = list(output.prompt_logprobs)
                delta = await self._delta(output.outputs[0], state, job, trace_id)
                finished = output.finished
                timing.tick(len(delta.token_ids), finished)
                state.add(delta)
                if finished:
                    self._observe(state, plan, timing)
                yield delta, state
        finally:
            self._set_queue(waiting=0 if started else -1, running=-1 if started else 0)
            if not finished:
                self.aborted += 1
                with anyio.CancelScope(shield=True):
                    await self.engine.abort(job.request_id)
            if trace_id is not None:
                self.receiver.release(trace_id)
            if gate_version is not None:
                self.gates_in_flight[gate_version] -= 1
                if not self.gates_in_flight[gate_version]:
                    del self.gates_in_flight[gate_version]

    async def _delta(
        self, completion, state: ChoiceState, job: ChoiceJob, trace_id: str | None
    ) -> ChoiceDelta:
        reason = completion.finish_reason
        if job.drop_output:
            return ChoiceDelta([], "", None, [], "length" if reason else None)
        token_ids = list(completion.token_ids)
        weights: list[list[float]] | None = [[1.0]] * len(token_ids)
        if trace_id is not None and token_ids and state.gate_weights is not None:
            start = len(state.token_ids)
            weights = await self.receiver.wait_for(
                trace_id,
                start + len(token_ids),
                start=start,
                timeout=self.settings.gate_trace_timeout_s,
            )
        elif trace_id is not None:
            weights = None if token_ids else []
        return ChoiceDelta(
            token_ids=token_ids,
            text=completion.text,
            logprobs=list(completion.logprobs) if completion.logprobs is not None else None,
            gate_weights=weights,
            finish_reason=finish_reason(reason),
        )

    # ------------------------------------------------------------ reports

    def mixture_report(
        self, state: ChoiceState, plan: GatePlan, delta: ChoiceDelta | None = None
    ) -> MixtureReport:
        """The choice's gate so far; ``per_token`` covers ``delta``'s tokens if given, else all."""
        experts = self.models.expert_names
        per_token = None
        if plan.per_token:
            source = delta.gate_weights if delta is not None else state.gate_weights
            per_token = list(source) if source is not None else None
        return MixtureReport(
            experts=list(experts),
            mean_weights=state.mean_weights(experts),
            gate_version=plan.gate_version,
            per_token=per_token,
        )

    @staticmethod
    def usage(prompts: list[list[int]], states: list[ChoiceState]) -> UsageInfo:
        """Prompt tokens count once per prompt, whatever ``n``; completion tokens per choice."""
        prompt_tokens = sum(len(ids) for ids in prompts)
        completion_tokens = sum(len(state.token_ids) for state in states)
        return UsageInfo(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )

    async def sse_stream(self, events: AsyncIterator[str]) -> AsyncIterator[str]:
        """SSE framing: the events, then ``[DONE]``; an error mid-stream goes out as an event
        (past the request's deadline: its 504)."""
        try:
            async for event in events:
                yield sse(event)
        except APIError as exc:
            self.metrics.observe_error(int(exc.status_code))
            yield sse(exc.to_response().model_dump_json())
        except Exception as exc:
            logger.exception("error while streaming")
            error = internal_error(exc)
            self.metrics.observe_error(int(error.status_code))
            yield sse(error.to_response().model_dump_json())
        finally:
            with anyio.CancelScope(shield=True):
                await events.aclose()
        yield SSE_DONE

    def _set_queue(self, waiting: int = 0, running: int = 0) -> None:
        self.waiting += waiting
        self.running += running
        self.metrics.set_queue(self.running, self.waiting)

    def _observe(self, state: ChoiceState, plan: GatePlan, timing: ChoiceTiming) -> None:
        experts = self.models.expert_names
        self.metrics.observe_request(
            model=plan.model,
            mean_weights=state.mean_weights(experts),
            token_weight_sums=state.weight_sums(experts),
            prompt_tokens=len(state.prompt_ids),
            generation_tokens=len(state.token_ids),
            ttft_s=timing.ttft_s if state.token_ids else None,
            itl_s=timing.itl_s if state.token_ids else [],
            e2e_s=timing.last - timing.arrival,
        )


async def _engine_errors(outputs: AsyncIterator) -> AsyncIterator:
    """The engine's outputs, with its request errors as ``APIError``s."""
    from vllm.exceptions import VLLMClientError
    from vllm.v1.engine.exceptions import EngineDeadError

    try:
        async for output in outputs:
            yield output
    except EngineDeadError as exc:
        raise engine_dead() from exc
    except (VLLMClientError, ValueError) as exc:  # the engine refused the request's parameters
        raise bad_request(str(exc), getattr(exc, "parameter", None)) from exc
