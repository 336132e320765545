"""Request fields -> vLLM sampling arguments; the fields this server refuses.

The composite model's "logits" are the mixture's log-probabilities, so every
sampling control vLLM applies (penalties, ``logit_bias``, ``min_p``, stop
token ids, structured outputs' grammar masks) acts on the mixture itself:
they are passed through, never re-implemented here.

A field that OpenAI or vLLM defines and that would change the result is either
honoured or refused with a 400 naming it (``refuse_unsupported``); only fields
that change nothing (``user``, ``metadata``, ``store``, ``priority``) and fields
nobody defines are accepted and ignored.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from gatemix.server.errors import bad_request, unsupported_field

# Fields OpenAI or vLLM define that gatemix does not do, each with the values that
# change nothing (what clients send by default) and why it is refused otherwise.
_UNSUPPORTED: dict[str, tuple[tuple[Any, ...], str]] = {
    "use_beam_search": ((False,), "beam search is not run over the mixture"),
    "length_penalty": ((1, 1.0), "it applies to beam search only"),
    "early_stopping": ((False,), "it applies to beam search only"),
    "truncate_prompt_tokens": ((), "prompts are never truncated"),
    "truncation_side": ((), "prompts are never truncated"),
    "prompt_embeds": ((), "the experts take token ids"),
    "logprob_token_ids": ((), "use logprobs (top tokens)"),
    "return_tokens_as_token_ids": ((False,), "it is served on /v1/completions only"),
    "continue_final_message": ((False,), "the last message is never continued"),
    "chat_template": ((), "the server's chat template is fixed (--chat-template)"),
    "chat_template_kwargs": ((), "the server's chat template takes no arguments"),
    "documents": ((), "the chat template takes no documents"),
    "vllm_xargs": ((), "per-request engine arguments are reserved for the gate"),
    "repetition_detection": ((), "repetition detection is not enabled"),
    "thinking_token_budget": ((), "no reasoning parser is configured"),
    "reasoning_effort": ((), "the experts have no reasoning mode"),
    "verbosity": ((), "the experts have no verbosity control"),
    "functions": ((), "deprecated by OpenAI: use tools"),
    "function_call": ((), "deprecated by OpenAI: use tool_choice"),
    "audio": ((), "the experts make text only"),
    "modalities": ((["text"],), "the experts make text only"),
    "prediction": ((), "predicted outputs are not supported"),
    "web_search_options": ((), "there is no web search"),
    "logits_processors": ((), "per-request logits processors are not supported"),
    "structural_tag": ((), "structural tags are not supported"),
}
_CHAT_ONLY_UNSUPPORTED = {
    "echo": ((False,), "chat completions do not echo the prompt"),
    "add_special_tokens": ((False,), "the chat template places the special tokens"),
}
# vLLM's legacy guided-decoding fields, honoured as the structured_outputs they name.
_GUIDED = {
    "guided_json": "json",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",
}
_GUIDED_OPTIONS = {"guided_whitespace_pattern": "whitespace_pattern"}


def refuse_unsupported(request, *, chat: bool) -> None:
    """A 400 naming the first field this server cannot honour, if any."""
    extra = request.model_extra or {}
    table = {**_UNSUPPORTED, **(_CHAT_ONLY_UNSUPPORTED if chat else {})}
    for name, (harmless, why) in table.items():
        if name in extra and extra[name] is not None and extra[name] not in harmless:
            raise unsupported_field(name, why)
    if not chat and request.suffix:
        raise unsupported_field("suffix", "completions are never inserted between text")
    best_of = getattr(request, "best_of", None)
    if best_of is not None and best_of != request.n:
        if best_of < request.n:
            raise bad_request(f"best_of ({best_of}) must be at least n ({request.n})", "best_of")
        raise unsupported_field("best_of", "choices are not re-ranked: use n and logprobs")


def structured_outputs(request):
    """The request's output constraint as vLLM ``StructuredOutputsParams``, or None.

    ``response_format`` overrides ``structured_outputs`` (as in vLLM), which the
    legacy ``guided_*`` fields fill in when it is absent.
    """
    # vLLM (and torch under it) takes seconds to import: the server's modules import without it.
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import StructuredOutputsParams

    fields: dict[str, Any] = {}
    param = "structured_outputs"
    if request.structured_outputs is not None:
        fields = request.structured_outputs.model_dump(by_alias=True, exclude_none=True)
    else:
        extra = request.model_extra or {}
        guided = {_GUIDED[name]: value for name, value in extra.items() if name in _GUIDED}
        if len(guided) > 1:
            raise bad_request("give at most one guided_* constraint", "guided_json")
        if guided:
            (param,) = [name for name in extra if name in _GUIDED]
            fields = guided
            for name, option in _GUIDED_OPTIONS.items():
                if extra.get(name) is not None:
                    fields[option] = extra[name]
    response_format = getattr(request, "response_format", None)
    if response_format is not None and response_format.type != "text":
        param = "response_format"
        options = {k: v for k, v in fields.items() if k.startswith(("disable_", "whitespace"))}
        if response_format.type == "json_object":
            fields = {**options, "json_object": True}
        else:
            fields = {**options, "json": response_format.json_schema.json_schema}
    if not fields:
        return None
    if isinstance(fields.get("json"), str):
        try:
            fields["json"] = json.loads(fields["json"])
        except json.JSONDecodeError as exc:
            raise bad_request(f"the JSON schema is not valid JSON: {exc}", param) from exc
    try:
        return StructuredOutputsParams(**fields)
    except (TypeError, ValueError, VLLMValidationError) as exc:
        raise bad_request(str(exc), param) from exc


def structured_param(request) -> str | None:
    """The field the request's output constraint comes from (``structured_outputs`` precedence)."""
    response_format = getattr(request, "response_format", None)
    if response_format is not None and response_format.type != "text":
        return "response_format"
    if request.structured_outputs is not None:
        return "structured_outputs"
    return next((name for name in (request.model_extra or {}) if name in _GUIDED), None)


def check_token_ids(token_ids, vocab_size: int, param: str) -> None:
    bad = sorted({int(t) for t in token_ids if int(t) >= vocab_size})
    if bad:
        raise bad_request(
            f"token ids {bad[:5]} are not below the vocabulary size {vocab_size}", param
        )


def sampling_kwargs(request, *, stop: list[str], logprobs: int | None, vocab_size: int) -> dict:
    """vLLM ``SamplingParams`` keyword arguments shared by both endpoints (no n, seed, max_tokens).

    ``stop`` and ``logprobs`` come checked against the server's limits; token ids are
    checked here against the vocabulary, so that a bad one is a 400 naming its field.
    """
    logit_bias = None
    if request.logit_bias:
        logit_bias = {int(token): bias for token, bias in request.logit_bias.items()}
        check_token_ids(logit_bias, vocab_size, "logit_bias")
    for name in ("stop_token_ids", "allowed_token_ids"):
        check_token_ids(getattr(request, name) or [], vocab_size, name)
    return {
        "temperature": request.temperature,
        "top_p": request.top_p,
        # -1 (OpenAI-style) and a k past the vocabulary both mean vLLM's 0: no top-k.
        "top_k": 0 if request.top_k == -1 or request.top_k >= vocab_size else request.top_k,
        "min_p": request.min_p,
        "presence_penalty": request.presence_penalty,
        "frequency_penalty": request.frequency_penalty,
        "repetition_penalty": request.repetition_penalty,
        "stop": stop,
        "stop_token_ids": request.stop_token_ids,
        "include_stop_str_in_output": request.include_stop_str_in_output,
        "min_tokens": request.min_tokens,
        "ignore_eos": request.ignore_eos,
        "logprobs": logprobs,
        "skip_special_tokens": request.skip_special_tokens,
        "spaces_between_special_tokens": request.spaces_between_special_tokens,
        "logit_bias": logit_bias,
        "allowed_token_ids": request.allowed_token_ids,
        "bad_words": request.bad_words,
        "structured_outputs": structured_outputs(request),
    }


@dataclass(frozen=True)
class SamplingSettings:
    """A request's vLLM sampling arguments, converted once from the request and checked.

    n, seed and max_tokens are per choice (``to_sampling_params``). Nothing changes
    a settings object: ``replace`` makes a new one (the endpoint's own arguments:
    prompt logprobs, a tool plan's grammar).
    """

    arguments: Mapping[str, Any]  # read-only: SamplingParams keyword arguments

    @classmethod
    def from_request(
        cls, request, *, stop: list[str], logprobs: int | None, vocab_size: int
    ) -> SamplingSettings:
        kwargs = sampling_kwargs(request, stop=stop, logprobs=logprobs, vocab_size=vocab_size)
        return cls(MappingProxyType(kwargs))

    def replace(self, **changes: Any) -> SamplingSettings:
        return SamplingSettings(MappingProxyType({**self.arguments, **changes}))

    def verify(self, engine, structured_param: str | None) -> None:
        verify_sampling(engine, dict(self.arguments), structured_param)

    def to_sampling_params(self, *, seed: int | None, max_tokens: int, drop_output: bool):
        """vLLM ``SamplingParams`` for one choice (built once per choice); vLLM's checks -> 400s.

        ``drop_output``: max_tokens 0 asked for; the engine makes one token, never shown,
        so that no min_tokens may force more.
        """
        # vLLM (and torch under it) takes seconds to import: the server's modules import without it.
        from vllm.exceptions import VLLMClientError
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        kwargs = {**self.arguments, **({"min_tokens": 0} if drop_output else {})}
        try:
            return SamplingParams(
                n=1,
                seed=seed,
                max_tokens=max_tokens,
                # Deltas for both paths: the non-streaming one accumulates them.
                output_kind=RequestOutputKind.DELTA,
                **kwargs,
            )
        except (ValueError, VLLMClientError) as exc:  # vLLM's own range checks
            raise bad_request(str(exc), getattr(exc, "parameter", None)) from exc


def verify_sampling(engine, sampling: dict, structured_param: str | None) -> None:
    """The engine's own checks (logit_bias, token ids, the grammar) now, not mid-stream.

    On the request's sampling arguments, before the lengths are known; a structured
    output's error names the field it came from.
    """
    # vLLM (and torch under it) takes seconds to import: the server's modules import without it.
    from vllm.exceptions import VLLMClientError
    from vllm.sampling_params import SamplingParams

    config = engine.vllm_config
    refuse_cpu_sampling_with_draft(config, sampling)
    try:
        SamplingParams(n=1, max_tokens=None, **sampling).verify(
            engine.model_config,
            config.speculative_config,
            config.structured_outputs_config,
            engine.tokenizer,
        )
    except (ValueError, TypeError, VLLMClientError) as exc:
        param = getattr(exc, "parameter", None)
        if param is None and sampling.get("structured_outputs") is not None:
            param = structured_param
        raise bad_request(str(exc), param) from exc


def refuse_cpu_sampling_with_draft(config, sampling: dict) -> None:
    """A 400 for temperature > 0 with a draft on vLLM's CPU backend, whose rejection sampler is not exact."""
    temperature = sampling.get("temperature")
    if config.speculative_config is None or (temperature is not None and temperature <= 0):
        return
    from gatemix.engine.engine_config import on_cpu  # vLLM's platform: deferred, as above
    from gatemix.engine.spec_decode import CPU_SAMPLING_WITH_DRAFT

    if on_cpu():
        raise bad_request(CPU_SAMPLING_WITH_DRAFT, "temperature")
