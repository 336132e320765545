"""One choice = one engine request: its job, its output so far, its timing.

``merge_streams`` runs several choices concurrently and yields their outputs
as they arrive, within the request's deadline; closing it cancels the choices
still running.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import anyio


@dataclass
class ChoiceJob:
    """One engine request: one choice of one prompt."""

    index: int
    prompt_ids: list[int]
    params: object  # vllm SamplingParams, without the gate's extra_args yet
    drop_output: bool  # max_tokens 0: the engine makes one token, the client gets none
    request_id: str


@dataclass
class ChoiceDelta:
    """What one engine output added to a choice."""

    token_ids: list[int]
    text: str
    logprobs: list[dict] | None  # per new token: token id -> vllm Logprob
    gate_weights: list[list[float]] | None  # (new tokens, K); None when missing
    finish_reason: str | None


@dataclass(frozen=True)
class DraftAcceptance:
    """One choice's speculative steps under a draft (vLLM's per-request spec-decode metrics)."""

    steps: int  # verify steps
    draft_tokens: int  # tokens the draft proposed
    accepted_tokens: int  # of those, accepted by the ensemble

    @classmethod
    def of(cls, completion) -> DraftAcceptance | None:
        """From a vLLM ``CompletionOutput``; None without a draft (or before the choice ends)."""
        metrics = getattr(completion, "spec_decode_metrics", None)
        if metrics is None:
            return None
        accepted = sum(j * count for j, count in enumerate(metrics.histogram))
        return cls(sum(metrics.histogram), metrics.num_draft_tokens, accepted)

    @classmethod
    def from_counters(cls, counters: dict[str, float]) -> DraftAcceptance:
        """From vLLM's engine-wide ``vllm:spec_decode_*`` totals (0 where one is missing)."""
        return cls(int(counters.get("vllm:spec_decode_num_drafts", 0)),
                   int(counters.get("vllm:spec_decode_num_draft_tokens", 0)),
                   int(counters.get("vllm:spec_decode_num_accepted_tokens", 0)))

    def __add__(self, other: DraftAcceptance) -> DraftAcceptance:
        return DraftAcceptance(self.steps + other.steps, self.draft_tokens + other.draft_tokens,
                               self.accepted_tokens + other.accepted_tokens)

    def __sub__(self, other: DraftAcceptance) -> DraftAcceptance:
        return DraftAcceptance(self.steps - other.steps, self.draft_tokens - other.draft_tokens,
                               self.accepted_tokens - other.accepted_tokens)

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted over proposed draft tokens (None before any proposal)."""
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else None

    @property
    def mean_acceptance_length(self) -> float | None:
        """Tokens per verify step, 1 + accepted per step (vLLM's figure; None before any step)."""
        return 1 + self.accepted_tokens / self.steps if self.steps else None

    def figures(self) -> dict[str, float | None]:
        return {"acceptance_rate": self.acceptance_rate, "mean_acceptance_length": self.mean_acceptance_length}


@dataclass
class ChoiceState:
    """A choice's output so far."""

    index: int
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[dict] = field(default_factory=list)
    prompt_logprobs: list[dict | None] | None = None  # (prompt tokens,), first entry None
    gate_weights: list[list[float]] | None = field(default_factory=list)  # (tokens, K)
    finish_reason: str | None = None
    draft_acceptance: DraftAcceptance | None = None  # set when the choice ends, with a draft
    # (K,) running sum of gate_weights over tokens: every streamed chunk reports the mean
    # so far, and re-summing all tokens per chunk would cost O(tokens^2) per request.
    _weight_totals: list[float] = field(default_factory=list, repr=False)

    def add(self, delta: ChoiceDelta) -> None:
        self.token_ids += delta.token_ids
        self.text += delta.text
        if delta.logprobs:
            self.logprobs += delta.logprobs
        if self.gate_weights is not None and delta.gate_weights is not None:
            self.gate_weights += delta.gate_weights
            for token in delta.gate_weights:
                if not self._weight_totals:
                    self._weight_totals = [0.0] * len(token)
                for k, weight in enumerate(token):
                    self._weight_totals[k] += weight
        elif delta.token_ids:
            self.gate_weights = None  # one missing token makes the mean unknown
        self.finish_reason = delta.finish_reason or self.finish_reason

    def weight_sums(self, experts: Sequence[str]) -> dict[str, float]:
        if not self.gate_weights:
            return {}
        return dict(zip(experts, self._weight_totals))

    def mean_weights(self, experts: Sequence[str]) -> dict[str, float]:
        sums = self.weight_sums(experts)
        return {name: total / len(self.gate_weights) for name, total in sums.items()}


@dataclass
class ChoiceTiming:
    """Seconds (monotonic) of one choice: arrival, first token, gaps between tokens."""

    arrival: float
    last: float = 0.0
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)

    def tick(self, new_tokens: int, finished: bool) -> None:
        now = time.monotonic()
        if new_tokens:
            if self.ttft_s is None:
                self.ttft_s = now - self.arrival
                self.itl_s += [0.0] * (new_tokens - 1)
            else:
                self.itl_s += [(now - self.last) / new_tokens] * new_tokens
        self.last = now


async def merge_streams(streams: list[AsyncIterator], deadline=None) -> AsyncIterator:
    """Items of several async iterators as they come; closing this cancels the rest.

    Each iterator runs in a task of its own, so that waiting for the next item
    can be bounded by ``deadline`` (``limits.Deadline``): past it the iterators
    are cancelled (aborting their engine requests) and its 504 is raised.
    """
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(stream: AsyncIterator) -> None:
        try:
            async for item in stream:
                await queue.put((item, None))
            await queue.put((done, None))
        except Exception as exc:  # noqa: BLE001 - re-raised in the consumer
            await queue.put((None, exc))

    tasks = [asyncio.create_task(pump(stream)) for stream in streams]
    try:
        remaining = len(tasks)
        while remaining:
            timeout = deadline.remaining() if deadline is not None else None
            try:
                item, exc = await asyncio.wait_for(queue.get(), timeout)
            except asyncio.TimeoutError:
                raise deadline.expired() from None
            if exc is not None:
                raise exc
            if item is done:
                remaining -= 1
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        with anyio.CancelScope(shield=True):
            await asyncio.gather(*tasks, return_exceptions=True)
