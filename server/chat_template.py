"""Chat messages -> prompt text, with the tokenizer's chat template or gatemix's fallback.

The fallback (used when the model folder's tokenizer has no ``chat_template``)
is the template the demo build installs: the BOS token, then per message
``<|role|>\\n{content}\\n``, then ``<|assistant|>\\n`` to prompt the answer::

    <|bos|><|system|>
    You are terse.
    <|user|>
    Hello
    <|assistant|>
"""

from __future__ import annotations

import jinja2
import jinja2.meta

from gatemix.server.errors import bad_request
from gatemix.server.protocol import ChatMessage

FALLBACK_CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{{- '<|' + message['role'] + '|>\\n' + message['content'] + '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}"
)


def template_renders_tools(template: str) -> bool:
    """Whether the template reads ``tools`` at all: without it, tools would never reach the model."""
    return "tools" in jinja2.meta.find_undeclared_variables(jinja2.Environment().parse(template))


def message_dicts(messages: list[ChatMessage], tools_allowed: bool) -> list[dict]:
    """Messages as the template sees them; text parts are joined, other parts refused.

    Tool results and an assistant's earlier tool calls only reach the model through a
    template that renders tools; otherwise they are refused, not dropped.
    """
    result = []
    for i, message in enumerate(messages):
        content = message.content
        if isinstance(content, list):
            if any(part.type != "text" or part.text is None for part in content):
                raise bad_request("only text content parts are supported", f"messages.{i}.content")
            content = "".join(part.text for part in content)
        if not tools_allowed and (message.role == "tool" or message.tool_calls):
            field = "role" if message.role == "tool" else "tool_calls"
            raise bad_request(
                "tool messages need a chat template that renders tools and a tool parser",
                f"messages.{i}.{field}",
                code="unsupported_parameter",
            )
        role = "system" if message.role == "developer" else message.role
        entry: dict = {"role": role, "content": content or ""}
        if message.name is not None:
            entry["name"] = message.name
        if message.tool_calls:
            entry["tool_calls"] = [call.model_dump() for call in message.tool_calls]
        if message.tool_call_id is not None:
            entry["tool_call_id"] = message.tool_call_id
        result.append(entry)
    return result


class ChatRenderer:
    """Chat messages -> prompt text with one template: ``--chat-template``, the tokenizer's,
    or gatemix's fallback."""

    def __init__(self, tokenizer, template: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.template = (
            template or getattr(tokenizer, "chat_template", None) or FALLBACK_CHAT_TEMPLATE
        )
        self.renders_tools = template_renders_tools(self.template)

    def render(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
    ) -> str:
        """The prompt text; template errors (e.g. a role the template refuses) are 400s."""
        try:
            return self.tokenizer.apply_chat_template(
                messages,
                chat_template=self.template,
                add_generation_prompt=add_generation_prompt,
                tools=tools,
                tokenize=False,
            )
        except (ValueError, TypeError, KeyError) as exc:
            raise bad_request(
                f"the chat template could not render the messages: {exc}", "messages"
            ) from exc
        except Exception as exc:  # jinja2's TemplateError and raise_exception()
            if type(exc).__module__.startswith("jinja2"):
                raise bad_request(
                    f"the chat template refused the messages: {exc}", "messages"
                ) from exc
            raise
