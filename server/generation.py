"""Generation: each choice as one engine request, its outputs as deltas, merged.

Each choice of a response is its own engine request (vLLM's ``n > 1`` fan-out
would copy one gate-trace id to every child), with its own request id and
trace id. The choices run concurrently and their outputs are merged as they
arrive.

Outputs are always requested as deltas (``RequestOutputKind.DELTA``), so the
streaming and the non-streaming paths see the same engine outputs; the latter
just accumulates them.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import anyio

from gatemix.server.choices import (
    ChoiceDelta,
    ChoiceJob,
    ChoiceState,
    ChoiceTiming,
    DraftAcceptance,
    merge_streams,
)
from gatemix.server.errors import bad_request, engine_dead
from gatemix.server.gate_trace_join import ChoiceTrace, GateTraceJoin
from gatemix.server.limits import Deadline
from gatemix.server.served_models import GatePlan
from gatemix.server.serving_metrics import ServingMetrics


def finish_reason(vllm_reason: str | None) -> str | None:
    """OpenAI's reasons: "length" when max_tokens ran out, else "stop" (EOS or a stop string)."""
    if vllm_reason is None:
        return None
    return "length" if vllm_reason == "length" else "stop"


class Generation:
    """The engine calls: ``generate`` per choice, ``abort`` for every unfinished one."""

    def __init__(self, *, engine, gate: GateTraceJoin, recorder: ServingMetrics) -> None:
        self.engine = engine  # vLLM's AsyncLLM (generate, abort)
        self.gate = gate
        self.recorder = recorder

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
        trace = self.gate.open(plan)
        if trace is not None:  # the job's own params: the trace is known only now
            job.params.extra_args = trace.extra_args
        timing = ChoiceTiming(arrival=time.monotonic())
        finished, started = False, False
        self.recorder.submitted()
        try:
            outputs = self.engine.generate(
                {"prompt_token_ids": job.prompt_ids}, job.params, job.request_id
            )
            async for output in _engine_errors(outputs):
                if not started:
                    started = True
                    self.recorder.started()
                if output.prompt_logprobs is not None and state.prompt_logprobs is None:
                    state.prompt_logprobs = list(output.prompt_logprobs)
                delta = await self._delta(output.outputs[0], state, job, trace)
                finished = output.finished
                timing.tick(len(delta.token_ids), finished)
                state.add(delta)
                if finished:
                    state.draft_acceptance = DraftAcceptance.of(output.outputs[0])
                    self.recorder.observe_choice(state, plan, timing)
                yield delta, state
        finally:
            self.recorder.ended(started=started, finished=finished)
            if not finished:
                with anyio.CancelScope(shield=True):
                    await self.engine.abort(job.request_id)
            self.gate.close(trace)

    async def _delta(
        self, completion, state: ChoiceState, job: ChoiceJob, trace: ChoiceTrace | None
    ) -> ChoiceDelta:
        reason = completion.finish_reason
        if job.drop_output:
            return ChoiceDelta([], "", None, [], "length" if reason else None)
        token_ids = list(completion.token_ids)
        return ChoiceDelta(
            token_ids=token_ids,
            text=completion.text,
            logprobs=list(completion.logprobs) if completion.logprobs is not None else None,
            gate_weights=await self.gate.token_weights(trace, state, token_ids),
            finish_reason=finish_reason(reason),
        )


async def _engine_errors(outputs: AsyncIterator) -> AsyncIterator:
    """The engine's outputs, with its request errors as ``APIError``s."""
    # vLLM (and torch under it) takes seconds to import: the server's modules import without it.
    from vllm.exceptions import VLLMClientError
    from vllm.v1.engine.exceptions import EngineDeadError

    try:
        async for output in outputs:
            yield output
    except EngineDeadError as exc:
        raise engine_dead() from exc
    except (VLLMClientError, ValueError) as exc:  # the engine refused the request's parameters
        raise bad_request(str(exc), getattr(exc, "parameter", None)) from exc
