"""Pydantic request and response models of the OpenAI-compatible API, and only those.

Fields follow the order of the official OpenAI API reference; gatemix's (and
vLLM's) extensions sit under a marked comment at the end of each model. Unknown
request fields are accepted and ignored (logged), like OpenAI and vLLM do.

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

from pydantic import BaseModel, ConfigDict, Field, model_validator

logger = logging.getLogger(__name__)

_INT64 = 2**63 - 1
TokenId = Annotated[int, Field(ge=0)]


class OpenAIBaseModel(BaseModel):
    """Requests: extra fields are allowed (the openai client's ``extra_body``) and logged."""

    model_config = ConfigDict(extra="allow")

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
    include_usage: bool | None = False


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class MixtureRequest(BaseModel):
    """gatemix extension (``extra_body={"mixture": {...}}``): this request's gate."""

    model_config = ConfigDict(extra="forbid")

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


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "gatemix"
    # gatemix extension
    root: str | None = None  # the model folder
    experts: list[str] | None = None  # what the name serves: all experts, or one


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard] = Field(default_factory=list)


# ---------------------------------------------------------------- /v1/completions


class CompletionRequest(OpenAIBaseModel):
    # https://platform.openai.com/docs/api-reference/completions/create
    model: str | None = None
    prompt: list[TokenId] | list[list[TokenId]] | str | list[str]
    echo: bool = False
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logprobs: int | None = Field(None, ge=0)
    max_tokens: int | None = Field(16, ge=0)
    n: int = Field(1, ge=1)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    seed: int | None = Field(None, ge=-_INT64 - 1, le=_INT64)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    user: str | None = None

    # --- gatemix / vLLM extensions
    top_k: int = Field(-1, ge=-1)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    return_token_ids: bool = False
    mixture: MixtureRequest | None = None


class CompletionLogProbs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    finish_reason: Literal["stop", "length"] | None = None
    index: int
    logprobs: CompletionLogProbs | None = None
    text: str
    # gatemix extensions
    mixture: MixtureReport | None = None
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
    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatCompletionRequest(OpenAIBaseModel):
    # https://platform.openai.com/docs/api-reference/chat/create
    messages: list[ChatMessage] = Field(min_length=1)
    model: str | None = None
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logprobs: bool = False
    max_completion_tokens: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    seed: int | None = Field(None, ge=-_INT64 - 1, le=_INT64)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_logprobs: int | None = Field(None, ge=0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    user: str | None = None

    # --- gatemix / vLLM extensions
    top_k: int = Field(-1, ge=-1)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    add_generation_prompt: bool = True
    mixture: MixtureRequest | None = None


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


class ChatCompletionChoice(BaseModel):
    finish_reason: Literal["stop", "length"] | None = None
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
    # gatemix extension: choice 0's report
    mixture: MixtureReport | None = None


class ChatDelta(BaseModel):
    content: str | None = None
    role: Literal["assistant"] | None = None


class ChatCompletionStreamChoice(BaseModel):
    delta: ChatDelta
    finish_reason: Literal["stop", "length"] | None = None
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
