"""Pydantic models of vLLM's tokenizer endpoints, and only those.

``/tokenize``, ``/detokenize`` and ``/tokenizer_info`` take and return what
vLLM's own server does (``vllm/entrypoints/serve/tokenize/protocol.py``), so
clients that find the tokenizer through them (lm-evaluation-harness's
``local-completions``) work unchanged. ``/version`` and ``/load`` answer like
vLLM's too.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from gatemix.server.protocol import ChatMessage, OpenAIBaseModel, TokenId
from gatemix.server.protocol_structured import ChatTool


class TokenizeCompletionRequest(OpenAIBaseModel):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = Field(True, description="add the tokenizer's special tokens (BOS)")
    return_token_strs: bool | None = Field(False, description="also return each token's string")


class TokenizeChatRequest(OpenAIBaseModel):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    return_token_strs: bool | None = False
    add_special_tokens: bool = Field(
        False, description="special tokens on top of those the chat template places"
    )
    tools: list[ChatTool] | None = None


TokenizeRequest = TokenizeCompletionRequest | TokenizeChatRequest


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(OpenAIBaseModel):
    model: str | None = None
    tokens: list[TokenId]


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfoResponse(BaseModel):
    """The tokenizer's configuration (its ``tokenizer_config.json``), without file paths."""

    model_config = ConfigDict(extra="allow")

    tokenizer_class: str


class VersionResponse(BaseModel):
    version: str  # vLLM's, as vLLM's own /version says
    gatemix_version: str


class LoadResponse(BaseModel):
    """vLLM's ``/load``, which load-aware routers read to pick the least busy server."""

    server_load: int = Field(description="engine requests admitted and not yet answered")
