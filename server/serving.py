"""The engine side shared by the completions and chat endpoints: request checks and limits,
one job per choice, and the parts each responsibility lives in.

* checks and jobs: here (every check that depends on the settings, the vocabulary
  or the context length, before any engine work);
* generation, the engine calls: ``generation.Generation``;
* joining the gate's per-token weights to the tokens: ``gate_trace_join.GateTraceJoin``;
* the request counts and metrics: ``serving_metrics.ServingMetrics``;
* SSE framing: ``sse.sse_stream``.
"""

from __future__ import annotations

import uuid

from gatemix.server.choices import ChoiceDelta, ChoiceJob, ChoiceState
from gatemix.server.errors import bad_request
from gatemix.server.gate_trace_join import GateTraceJoin
from gatemix.server.generation import Generation
from gatemix.server.limits import Deadline, Ticket
from gatemix.server.protocol import ChatCompletionRequest, CompletionRequest, MixtureReport
from gatemix.server.sampling import (
    SamplingSettings,
    check_token_ids,
    refuse_unsupported,
    structured_param,
)
from gatemix.server.served_models import GatePlan, ServedModels
from gatemix.server.serving_metrics import ServingMetrics
from gatemix.server.settings import Settings

Request = CompletionRequest | ChatCompletionRequest


class ServingEngine:
    """One engine, one tokenizer, the served names and the settings, for both endpoints."""

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
        self.engine = engine  # vLLM's AsyncLLM; its verify checks run on each request's sampling
        self.tokenizer = tokenizer
        self.models = models  # replaced on a gate swap (``gate_admin.py``)
        self.metrics = metrics  # GateMetrics
        self.settings = settings
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len  # the engine's context, prompt and completion together
        self.gate = GateTraceJoin(receiver=receiver, timeout_s=settings.gate_trace_timeout_s)
        self.recorder = ServingMetrics(metrics=metrics, expert_names=models.expert_names)
        self.generation = Generation(engine=engine, gate=self.gate, recorder=self.recorder)

    def deadline(self) -> Deadline:
        return Deadline(self.settings.request_timeout_s)

    # ------------------------------------------------------------ checks

    def check_request(
        self, request: Request, *, chat: bool, logprobs: int | None
    ) -> SamplingSettings:
        """Every check that depends on the settings or the vocabulary, before any prompt work;
        the request's sampling arguments, converted and verified by the engine."""
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
        sampling = SamplingSettings.from_request(
            request, stop=stops, logprobs=logprobs, vocab_size=self.vocab_size
        )
        sampling.verify(self.engine, structured_param(request))
        return sampling

    def check_token_ids(self, token_ids: list[int], param: str) -> None:
        check_token_ids(token_ids, self.vocab_size, param)

    def engine_max_tokens(
        self,
        prompt_len: int,
        requested: int | None,
        param: str,
        prompt_param: str,
        default_cap: int,
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

    # ------------------------------------------------------------ jobs

    def make_jobs(
        self,
        request: Request,
        prompts: list[list[int]],
        sampling: SamplingSettings,
        ticket: Ticket,
        *,
        max_tokens_param: str,
        prompt_param: str,
    ) -> list[ChoiceJob]:
        """``request.n`` engine requests per prompt; choice ``p * n + i`` is prompt p's i-th,
        with its own ``SamplingParams`` (a ``seed`` becomes ``seed + i`` for choice i).

        The request's output, prompts x n x max_tokens, is capped by the settings'
        ``max_output_tokens``; its choices are admitted (or refused with a 429) last.
        """
        n, seed, max_tokens = request.n, request.seed, getattr(request, max_tokens_param)
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
        for p, (prompt_ids, (engine_max, drop)) in enumerate(zip(prompts, lengths)):
            for i in range(n):
                params = sampling.to_sampling_params(
                    seed=None if seed is None else seed + i, max_tokens=engine_max, drop_output=drop
                )
                index = p * n + i
                jobs.append(
                    ChoiceJob(index, prompt_ids, params, drop, f"gatemix-{response_key}-{index}")
                )
        ticket.admit(len(jobs))
        return jobs

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
