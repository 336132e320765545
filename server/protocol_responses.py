"""Pydantic models of ``POST /v1/responses`` (OpenAI's Responses API, text only), and only those.

Fields follow the order of the official OpenAI API reference; vLLM's sampling
extensions and gatemix's ``mixture`` sit under a marked comment. A request is
served through the chat path (``serving_responses.py``), so every field here
means what the chat field it becomes means.

Some unions end in a member left out of the OpenAPI document
(``SkipJsonSchema``): an input item, a content part, a tool or a tool choice
of a type OpenAI defines but this server cannot honour (``input_image``,
``web_search``, ...). Such a value passes validation so that the serving code
refuses it with a 400 that names it and says why, instead of pydantic's "input
should be 'function'"; the document promises only what is served.
"""

from __future__ import annotations

import time
from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic.json_schema import SkipJsonSchema

from gatemix.server.protocol import (
    STRICT,
    ChatTokenLogprob,
    LogitBias,
    MixtureReport,
    NonEmptyStr,
    NonNegativeInt,
    OpenAIBaseModel,
    PositiveInt,
    PromptLogprobs,
    SamplingExtensions,
    Seed,
    Stop,
)

# Strict like every request model; extra fields allowed (an earlier response's output items
# carry ids, statuses and annotations a client may send back as they are).
_ITEM = ConfigDict(strict=True, extra="allow")
LOGPROBS_INCLUDE = "message.output_text.logprobs"


class _OtherType(BaseModel):
    """A value of a type this server does not serve: refused by the serving code, by name."""

    model_config = _ITEM
    served: ClassVar[frozenset[str]] = frozenset()  # types a served model takes
    type: str

    @field_validator("type")
    @classmethod
    def _not_served(cls, value: str) -> str:
        if value in cls.served:
            raise ValueError(f"{value!r} is served; its fields are wrong")
        return value


# ---------------------------------------------------------------- input items


class InputTextPart(BaseModel):
    """Text: the user's (``input_text``) or an earlier answer's (``output_text``)."""

    model_config = _ITEM
    type: Literal["input_text", "output_text"]
    text: str


class OtherPart(_OtherType):
    served = frozenset({"input_text", "output_text"})


TextContent = str | list[InputTextPart | SkipJsonSchema[OtherPart]]


class InputMessage(BaseModel):
    model_config = _ITEM
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: TextContent


class FunctionCallItem(BaseModel):
    """An earlier call of a function tool (the model's output, sent back)."""

    model_config = _ITEM
    type: Literal["function_call"]
    call_id: NonEmptyStr
    name: NonEmptyStr
    arguments: str  # JSON text


class FunctionCallOutputItem(BaseModel):
    """A function's result, answering the call ``call_id``."""

    model_config = _ITEM
    type: Literal["function_call_output"]
    call_id: NonEmptyStr
    output: TextContent


class OtherItem(_OtherType):
    served = frozenset({"message", "function_call", "function_call_output"})


InputItem = InputMessage | FunctionCallItem | FunctionCallOutputItem | SkipJsonSchema[OtherItem]

# ---------------------------------------------------------------- tools and text format


class FunctionTool(BaseModel):
    model_config = STRICT
    type: Literal["function"]
    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")
    description: str | None = None
    parameters: dict | None = None  # a JSON schema
    strict: bool | None = None


class OtherTool(_OtherType):
    served = frozenset({"function"})


class ToolChoiceFunction(BaseModel):
    model_config = STRICT
    type: Literal["function"]
    name: str


ToolChoice = Literal["none", "auto", "required"] | ToolChoiceFunction


class FormatText(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    type: Literal["text"]


class FormatJsonObject(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    type: Literal["json_object"]


class FormatJsonSchema(BaseModel):
    # OpenAI's "schema" shadows pydantic's BaseModel.schema: aliased both ways.
    model_config = ConfigDict(
        strict=True, extra="forbid", populate_by_name=True, serialize_by_alias=True
    )
    type: Literal["json_schema"]
    name: str = Field(min_length=1, max_length=64)
    json_schema: dict = Field(alias="schema")
    description: str | None = None
    strict: bool | None = None


class TextConfig(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    format: Annotated[
        FormatText | FormatJsonObject | FormatJsonSchema, Field(discriminator="type")
    ] = Field(default_factory=lambda: FormatText(type="text"))


# ---------------------------------------------------------------- the request


class _ResponsesFields(OpenAIBaseModel):
    # https://platform.openai.com/docs/api-reference/responses/create
    include: list[Literal["message.output_text.logprobs"] | SkipJsonSchema[str]] | None = Field(
        None, description=f"only {LOGPROBS_INCLUDE!r} (with top_logprobs: that many alternatives)"
    )
    input: Annotated[list[InputItem], Field(min_length=1)] | NonEmptyStr = Field(
        description="with the instructions and the previous response's conversation, within "
        "the context together with max_output_tokens"
    )
    instructions: str | None = None  # a system message first; not carried to the next response
    max_output_tokens: PositiveInt | None = None
    metadata: dict[str, str] | None = None
    model: str | None = None
    parallel_tool_calls: bool | None = None  # false: the first call only
    previous_response_id: str | None = Field(
        None, description="a stored response (store true) of this server; any other is a 404"
    )
    store: bool | None = True
    stream: bool | None = False
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    text: TextConfig | None = Field(
        None, description="a format other than text excludes vLLM's structured_outputs"
    )
    tool_choice: ToolChoice | SkipJsonSchema[dict] | None = None
    tools: list[FunctionTool | SkipJsonSchema[OtherTool]] | None = None
    top_logprobs: NonNegativeInt | None = Field(
        None, description=f"needs include [{LOGPROBS_INCLUDE!r}]"
    )
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    user: str | None = None
    # --- vLLM's extensions of the Responses API
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: LogitBias | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    seed: Seed | None = None
    stop: Stop = None


class ResponsesRequest(SamplingExtensions, _ResponsesFields):
    """vLLM's sampling extensions and gatemix's ``mixture`` follow, shared with chat."""


# ---------------------------------------------------------------- the response


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[dict] = Field(default_factory=list)
    logprobs: list[ChatTokenLogprob] = Field(default_factory=list)  # with include


ItemStatus = Literal["in_progress", "completed", "incomplete"]


class OutputMessage(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    status: ItemStatus
    content: list[OutputText]


class FunctionToolCall(BaseModel):
    id: str
    type: Literal["function_call"] = "function_call"
    call_id: str
    name: str
    arguments: str  # JSON text
    status: ItemStatus


OutputItem = Annotated[OutputMessage | FunctionToolCall, Field(discriminator="type")]


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails = Field(default_factory=InputTokensDetails)
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens"]


ResponseStatus = Literal["in_progress", "completed", "incomplete", "failed"]


class ResponsesResponse(BaseModel):
    id: str
    object: Literal["response"] = "response"
    created_at: int = Field(default_factory=lambda: int(time.time()))
    status: ResponseStatus
    background: bool = False
    error: None = None  # a failure mid-stream is an ``error`` event
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    metadata: dict[str, str] | None = None
    model: str
    output: list[OutputItem] = Field(default_factory=list)
    parallel_tool_calls: bool = True
    previous_response_id: str | None = None
    temperature: float = 1.0
    text: TextConfig = Field(default_factory=TextConfig)
    tool_choice: ToolChoice = "auto"
    tools: list[FunctionTool] = Field(default_factory=list)
    top_logprobs: int | None = None
    top_p: float = 1.0
    truncation: Literal["disabled"] = "disabled"
    usage: ResponseUsage | None = None
    user: str | None = None
    # gatemix extension: the gate over every generated token; vLLM's: the prompt's logprobs
    mixture: MixtureReport | None = None
    prompt_logprobs: PromptLogprobs | None = Field(None, exclude_if=lambda v: v is None)


# ---------------------------------------------------------------- stream events
# Each event is one server-sent event named by its ``type``; ``sequence_number`` counts from 0.


class ResponseEvent(BaseModel):
    type: str
    sequence_number: int


class ResponseLifecycleEvent(ResponseEvent):
    """response.created, .in_progress, .completed, .incomplete: the response so far."""

    response: ResponsesResponse


class OutputItemEvent(ResponseEvent):
    """response.output_item.added, .done."""

    output_index: int
    item: OutputItem


class ContentPartEvent(ResponseEvent):
    """response.content_part.added, .done."""

    item_id: str
    output_index: int
    content_index: int
    part: OutputText


class TextDeltaEvent(ResponseEvent):
    type: Literal["response.output_text.delta"] = "response.output_text.delta"
    item_id: str
    output_index: int
    content_index: int
    delta: str
    logprobs: list[ChatTokenLogprob] = Field(default_factory=list)
    # gatemix extension: mean_weights so far; per_token of this delta's tokens (as in chat)
    mixture: MixtureReport | None = Field(None, exclude_if=lambda v: v is None)


class TextDoneEvent(ResponseEvent):
    type: Literal["response.output_text.done"] = "response.output_text.done"
    item_id: str
    output_index: int
    content_index: int
    text: str
    logprobs: list[ChatTokenLogprob] = Field(default_factory=list)


class ArgumentsDeltaEvent(ResponseEvent):
    type: Literal["response.function_call_arguments.delta"] = (
        "response.function_call_arguments.delta"
    )
    item_id: str
    output_index: int
    delta: str


class ArgumentsDoneEvent(ResponseEvent):
    type: Literal["response.function_call_arguments.done"] = (
        "response.function_call_arguments.done"
    )
    item_id: str
    output_index: int
    name: str
    arguments: str


class ErrorEvent(ResponseEvent):
    """A failure after the stream began (its status line is long gone): OpenAI's error event."""

    type: Literal["error"] = "error"
    code: str | None = None
    message: str
    param: str | None = None
