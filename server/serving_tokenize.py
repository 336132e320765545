"""``/tokenize``, ``/detokenize`` and ``/tokenizer_info`` with the served tokenizer.

Chat messages are rendered exactly as ``/v1/chat/completions`` renders them
(its template, its refusals), so ``/tokenize`` counts the tokens a chat
request would really send to the engine.
"""

from __future__ import annotations

from gatemix.server.chat_template import message_dicts
from gatemix.server.errors import unsupported_field
from gatemix.server.serving import ServingEngine
from gatemix.server.serving_chat import OpenAIServingChat
from gatemix.server.tokenize_protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeChatRequest,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfoResponse,
)

_PATH_FIELDS = ("vocab_file", "merges_file")  # as vLLM drops them


class OpenAIServingTokenization:
    def __init__(self, *, core: ServingEngine, chat: OpenAIServingChat) -> None:
        self.core = core
        self.chat = chat

    def tokenize(self, request: TokenizeRequest) -> TokenizeResponse:
        core = self.core
        core.models.plan(request.model, None)  # 404 for a name the server does not serve
        if isinstance(request, TokenizeChatRequest):
            tokens = self._chat_tokens(request)
        else:
            tokens = core.tokenizer(
                request.prompt, add_special_tokens=request.add_special_tokens
            ).input_ids
        token_strs = core.tokenizer.convert_ids_to_tokens(tokens) if request.return_token_strs else None
        return TokenizeResponse(
            count=len(tokens), max_model_len=core.max_model_len, tokens=tokens, token_strs=token_strs
        )

    def _chat_tokens(self, request: TokenizeChatRequest) -> list[int]:
        tools = self.chat.tools
        if request.tools and not tools.supported:
            raise unsupported_field("tools", tools.why_not)
        tool_dicts = [tool.model_dump(exclude_none=True) for tool in request.tools or []] or None
        messages = message_dicts(request.messages, tools.supported)
        text = self.chat.renderer.render(messages, request.add_generation_prompt, tool_dicts)
        return self.core.tokenizer(text, add_special_tokens=request.add_special_tokens).input_ids

    def detokenize(self, request: DetokenizeRequest) -> DetokenizeResponse:
        core = self.core
        core.models.plan(request.model, None)
        core.check_token_ids(request.tokens, "tokens")
        return DetokenizeResponse(prompt=core.tokenizer.decode(request.tokens))

    def tokenizer_info(self) -> TokenizerInfoResponse:
        tokenizer = self.core.tokenizer
        config = {
            key: _json_safe(value)
            for key, value in (getattr(tokenizer, "init_kwargs", None) or {}).items()
            if key not in _PATH_FIELDS
        }
        config["tokenizer_class"] = type(tokenizer).__name__
        config["chat_template"] = self.chat.renderer.template
        return TokenizerInfoResponse(**config)


def _json_safe(value):
    """vLLM's conversion: AddedToken-like objects become their text."""
    if hasattr(value, "content"):
        return value.content
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
