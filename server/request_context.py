"""One request, converted once: everything its choices run with and its response reports.

An endpoint builds its context before any engine work (every check done, the
choices admitted), from the protocol model; the stream, the choices and the
usage read the context, never the request's parts passed one by one.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field

from gatemix.server.choices import ChoiceJob, ChoiceState
from gatemix.server.limits import Deadline
from gatemix.server.protocol import ChatCompletionRequest, CompletionRequest, UsageInfo
from gatemix.server.sampling import SamplingSettings
from gatemix.server.served_models import GatePlan


def new_response_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


@dataclass(frozen=True, kw_only=True)
class RequestContext:
    """The parts every endpoint's request has; an endpoint's subclass adds its own."""

    request: CompletionRequest | ChatCompletionRequest  # the protocol model, as validated
    response_id: str
    plan: GatePlan  # the gate request: the model asked for, pinned weights, expert subset
    sampling: SamplingSettings  # the request's sampling arguments, checked
    prompts: list[list[int]]  # (prompts, prompt tokens)
    jobs: list[ChoiceJob]  # one engine request per choice: prompt p's i-th is p * n + i
    deadline: Deadline
    created: int = field(default_factory=lambda: int(time.time()))  # unix seconds

    @property
    def model(self) -> str:
        return self.plan.model

    @property
    def include_usage(self) -> bool:
        """A stream ends with a chunk that reports the usage."""
        options = self.request.stream_options
        return bool(options and options.include_usage)

    def in_order(self, states: dict[int, ChoiceState]) -> list[ChoiceState]:
        """The choices seen so far, in choice order (a stream cut short may miss some)."""
        return [states[job.index] for job in self.jobs if job.index in states]

    def response(self, response_cls: type, choices: list, usage: UsageInfo | None = None, **extra):
        """This request's response (``response_cls``, the endpoint's), or one streamed chunk of it."""
        return response_cls(
            id=self.response_id, choices=choices, created=self.created, model=self.model,
            usage=usage, **extra,
        )

    def chunk_json(self, response_cls: type, choices: list, usage: UsageInfo | None = None) -> str:
        """One streamed chunk of this request's response, as JSON."""
        return self.response(response_cls, choices, usage).model_dump_json()

    def usage(self, states: Iterable[ChoiceState]) -> UsageInfo:
        """Prompt tokens count once per prompt, whatever ``n``; completion tokens per choice."""
        prompt_tokens = sum(len(ids) for ids in self.prompts)
        completion_tokens = sum(len(state.token_ids) for state in states)
        return UsageInfo(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )
