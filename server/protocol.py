"""Pydantic request and response models of the OpenAI-compatible API, and only those.

Fields follow the order of the official OpenAI API reference; gatemix's (and
vLLM's) extensions sit under a marked comment at the end of each model. Unknown
request fields are accepted and ignored (logged), like vLLM does; fields that
OpenAI or vLLM define and that would change the result are either declared
here (and honoured) or refused by ``sampling.refuse_unsupported``.

Limits that depend on the server's settings (``n <= max_n``, the stop count,
``logprobs <= max_logprobs``, token ids below the vocabulary) are enforced by
the serving code and declared in the OpenAPI document by ``openapi.py``.

The ``mixture`` object (``MixtureReport``) reports the gate. It sits on every
choice; the response's top-level ``mixture`` repeats choice 0's, so that a
client with one choice reads ``response.mixture``. In a stream, each chunk that
carries tokens has the running report of its choice: ``mean_weights`` over the
tokens generated so far (the last chunk's equals the non-streaming report) and
``per_token`` for the chunk's own tokens only.
"""

from __future__ import annotations

import logging
import time
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from gatemix.server.protocol_structured import (
    ChatTool,
    NamedToolChoice,
    ResponseFormat,
    StructuredOutputs,
    ToolCall,
    ToolCallDelta,
)

logger = logging.getLogger(__name__)

_INT64 = 2**63 - 1


def _integral(value):
    """JSON Schema's integers include 3.0: a whole float is taken as the int; "3" and true are not."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# The bounds sit inside the whole-float step, so that the document states them (minimum: 0).
NonNegativeInt = Annotated[int, Field(ge=0), BeforeValidator(_integral)]
PositiveInt = Annotated[int, Field(ge=1), BeforeValidator(_integral)]
TopK = Annotated[int, Field(ge=-1, le=2**31 - 1), BeforeValidator(_integral)]  # -1: no top-k
Seed = Annotated[int, Field(ge=-_INT64 - 1, le=_INT64), BeforeValidator(_integral)]
TokenId = NonNegativeInt
NonEmptyStr = Annotated[str, Field(min_length=1)]
# A prompt is never empty: an empty string, an empty list, or a list holding one, is a 400.
Prompt = (
    Annotated[list[TokenId], Field(min_length=1)]
    | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1)]
    | NonEmptyStr
    | Annotated[list[NonEmptyStr], Field(min_length=1)]
)
Stop = NonEmptyStr | list[NonEmptyStr] | None
# vLLM bans each word with and without a leading space: it must hold more than whitespace,
# and all of them together at most 1024 tokens (VLLM_MAX_BAD_WORDS_TOTAL_TOKENS).
BadWords = Annotated[
    list[Annotated[str, Field(min_length=1, max_length=64, pattern=r"\S")]],
    Field(max_length=16, description="words never to generate; 1024 tokens in all at most"),
]
# OpenAI's logit_bias: token id (as a string) -> bias added to its logit, in [-100, 100].
LogitBias = dict[
    Annotated[str, Field(pattern=r"^(0|[1-9][0-9]{0,9})$")], Annotated[float, Field(ge=-100, le=100)]
]


# Requests take JSON's types as they are (strict): "5" is not a number and 1 is not true,
# as the OpenAPI document says; lax coercion would accept what the document refuses.
STRICT = ConfigDict(strict=True)


class OpenAIBaseModel(BaseModel):
    """Requests: extra fields are allowed (the openai client's ``extra_body``) and logged."""

    model_config = ConfigDict(extra="allow", strict=True)

    @model_validator(mode="after")
    def _log_ignored_fields(self):
        if self.model_extra:
            logger.warning("ignoring unsupported request fields: %s", sorted(self.model_extra))
        return self


# ---------------------------------------------------------------- shared


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class StreamOptions(BaseModel):
    model_config = STRICT

    include_usage: bool | None = False


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class MixtureRequest(BaseModel):
    """gatemix extension (``extra_body={"mixture": {...}}``): this request's gate."""

    model_config = ConfigDict(extra="forbid", strict=True)

    weights: dict[str, float] | None = Field(
        None, description="pin the gate: expert -> weight (unnamed experts get 0; positive sum)"
    )
    experts: list[str] | None = Field(
        None,
        description="restrict the mixture to these experts (the gate is renormalized over them)",
    )
    per_token: bool = Field(False, description="report every generated token's gate weights")


class MixtureReport(BaseModel):
    """gatemix extension: what the gate did for one choice."""

    experts: list[str]  # expert order of every weight vector
    mean_weights: dict[str, float]  # mean over generated tokens; {} when none (or weights missing)
    gate_version: str | None = None
    per_token: list[list[float]] | None = Field(None, exclude_if=lambda v: v is None)  # (tokens, K)


# ---------------------------------------------------------------- /v1/models


class GateCard(BaseModel):
    """gatemix extension: the gate the ensemble's name serves now."""

    version: str
    method: str  # how it was fitted: robust, constant, ...
    loaded_at: float  # unix time it started serving new requests
    report: str | None = None  # the fit's report, where the server can see it


class DraftCard(BaseModel):
    """gatemix extension: the draft model the engine decodes speculatively behind (every name)."""

    model: str  # the draft's folder
    num_draft_tokens: int  # tokens it proposes per step


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "gatemix"
    # gatemix extension
    root: str | None = None  # the model folder
    experts: list[str] | None = None  # what the name serves: all experts, or one
    gate: GateCard | None = None  # on the ensemble's card
    draft: DraftCard | None = None  # with --draft


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard] = Field(default_factory=list)


# ---------------------------------------------------------------- /v1/completions


class SamplingExtensions(OpenAIBaseModel):
    """vLLM's sampling extensions and gatemix's ``mixture``, shared by both endpoints.

    A request class lists it first among its bases, so its own OpenAI fields come
    first in the schema and these after them.
    """

    top_k: TopK = -1
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    min_tokens: NonNegativeInt = 0
    ignore_eos: bool = False
    stop_token_ids: list[TokenId] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    allowed_token_ids: Annotated[list[TokenId], Field(min_length=1)] | None = None
    bad_words: BadWords | None = None
    prompt_logprobs: NonNegativeInt | None = None
    structured_outputs: StructuredOutputs | None = None
    mixture: MixtureRequest | None = None


class _CompletionFields(OpenAIBaseModel):
    # https://platform.openai.com/docs/api-reference/completions/create
    model: str | None = None
    prompt: Prompt
    best_of: PositiveInt | None = Field(None, description="only best_of == n (no re-ranking)")
    echo: bool = False
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: LogitBias | None = None
    logprobs: NonNegativeInt | None = None
    max_tokens: NonNegativeInt | None = 16
    n: PositiveInt = 1
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    seed: Seed | None = None
    stop: Stop = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    suffix: str | None = Field(
        None,
        description="not supported (no insertion): a non-empty suffix is refused with 400",
        json_schema_extra={"maxLength": 0},
    )
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    user: str | None = None


class CompletionRequest(SamplingExtensions, _CompletionFields):
    # --- gatemix / vLLM extensions beyond the shared ones
    add_special_tokens: bool = True  # the tokenizer's BOS before a text prompt
    response_format: ResponseFormat | None = None
    return_token_ids: bool = False
    return_tokens_as_token_ids: bool = False  # vLLM's: logprobs' tokens as "token_id:<id>"


class CompletionLogProbs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class PromptLogprob(BaseModel):
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# vLLM's prompt_logprobs: per prompt token, token id -> its logprob (None for the first token).
PromptLogprobs = list[dict[int, PromptLogprob] | None]


class CompletionChoice(BaseModel):
    finish_reason: Literal["stop", "length"] | None = None
    index: int
    logprobs: CompletionLogProbs | None = None
    text: str
    # gatemix / vLLM extensions
    mixture: MixtureReport | None = None
    prompt_logprobs: PromptLogprobs | None = Field(None, exclude_if=lambda v: v is None)
    # With return_token_ids: the prompt's ids (a stream: in the first chunk) and the generated ids.
    prompt_token_ids: list[int] | None = Field(None, exclude_if=lambda v: v is None)
    token_ids: list[int] | None = Field(None, exclude_if=lambda v: v is None)


class CompletionResponse(BaseModel):
    id: str
    choices: list[CompletionChoice]
    created: int
    model: str
    object: Literal["text_completion"] = "text_completion"
    usage: UsageInfo | None = None
    # gatemix extension: choice 0's report
    mixture: MixtureReport | None = None


# ---------------------------------------------------------------- /v1/chat/completions


class ContentPart(BaseModel):
    """Text only: the experts read text (other parts are refused, not dropped)."""

    model_config = ConfigDict(extra="allow", strict=True)

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool's answer to one


class _ChatCompletionFields(OpenAIBaseModel):
    # https://platform.openai.com/docs/api-reference/chat/create
    messages: list[ChatMessage] = Field(min_length=1)
    model: str | None = None
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: LogitBias | None = None
    logprobs: bool = False
    max_completion_tokens: PositiveInt | None = None
    max_tokens: PositiveInt | None = None
    metadata: dict[str, str] | None = None
    n: PositiveInt = 1
    parallel_tool_calls: bool | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    response_format: ResponseFormat | None = None
    seed: Seed | None = None
    stop: Stop = None
    store: bool | None = None  # nothing is stored; it changes no result
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    tools: list[ChatTool] | None = None
    top_logprobs: NonNegativeInt | None = None
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    user: str | None = None


class ChatCompletionRequest(SamplingExtensions, _ChatCompletionFields):
    # --- gatemix / vLLM extensions beyond the shared ones
    add_generation_prompt: bool = True


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatChoiceLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(BaseModel):
    content: str | None = None
    role: Literal["assistant"] = "assistant"
    tool_calls: list[ToolCall] = Field(default_factory=list)


FinishReason = Literal["stop", "length", "tool_calls"]


class ChatCompletionChoice(BaseModel):
    finish_reason: FinishReason | None = None
    index: int
    logprobs: ChatChoiceLogprobs | None = None
    message: ChatResponseMessage
    # gatemix extension
    mixture: MixtureReport | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    choices: list[ChatCompletionChoice]
    created: int
    model: str
    object: Literal["chat.completion"] = "chat.completion"
    usage: UsageInfo | None = None
    # gatemix extension: choice 0's report; vLLM's: the prompt's logprobs
    mixture: MixtureReport | None = None
    prompt_logprobs: PromptLogprobs | None = Field(None, exclude_if=lambda v: v is None)


class ChatDelta(BaseModel):
    content: str | None = None
    role: Literal["assistant"] | None = None
    tool_calls: list[ToolCallDelta] | None = Field(None, exclude_if=lambda v: v is None)


class ChatCompletionStreamChoice(BaseModel):
    delta: ChatDelta
    finish_reason: FinishReason | None = None
    index: int
    logprobs: ChatChoiceLogprobs | None = None
    # gatemix extension
    mixture: MixtureReport | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    choices: list[ChatCompletionStreamChoice]
    created: int
    model: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    usage: UsageInfo | None = None
