"""Pydantic models of the request fields that constrain the output, and only those.

``response_format`` (OpenAI), ``structured_outputs`` (vLLM's extension) and
``tools``: each becomes vLLM structured outputs that the engine's sampler
applies to the mixture's distribution (``sampling.py``, ``tools.py``).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

NonEmptyStr = Annotated[str, Field(min_length=1)]


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(strict=True, populate_by_name=True)

    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    json_schema: dict | None = Field(None, alias="schema")  # OpenAI's name clashes with pydantic's
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's ``response_format``: the engine's structured outputs constrain the mixture."""

    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and (
            self.json_schema is None or self.json_schema.json_schema is None
        ):
            raise ValueError("response_format of type json_schema needs json_schema.schema")
        return self


class StructuredOutputs(BaseModel):
    """vLLM's ``structured_outputs`` extension: exactly one constraint on the output."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    # vLLM's name is "json", which would shadow BaseModel.json
    json_schema: dict | str | None = Field(None, alias="json")
    regex: NonEmptyStr | None = None
    choice: Annotated[list[str], Field(min_length=1)] | None = None
    grammar: NonEmptyStr | None = None  # EBNF (or Lark)
    json_object: bool | None = None
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None

    @model_validator(mode="after")
    def _one_constraint(self):
        kinds = {"json": self.json_schema, "regex": self.regex, "choice": self.choice,
                 "grammar": self.grammar, "json_object": self.json_object}
        given = [name for name, value in kinds.items() if value is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(kinds)} (got {given or 'none'})")
        return self


class FunctionCall(BaseModel):
    model_config = ConfigDict(strict=True)

    name: str
    arguments: str  # JSON text


class ToolCall(BaseModel):
    model_config = ConfigDict(strict=True)

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(strict=True)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")
    description: str | None = None
    parameters: dict | None = None  # a JSON schema
    strict: bool | None = None


class ChatTool(BaseModel):
    model_config = ConfigDict(strict=True)

    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = ConfigDict(strict=True)

    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(strict=True)

    type: Literal["function"] = "function"
    function: NamedFunction


class FunctionCallDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta | None = None
