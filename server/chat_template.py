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

from gatemix.server.errors import bad_request
from gatemix.server.protocol import ChatMessage

FALLBACK_CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{{- '<|' + message['role'] + '|>\\n' + message['content'] + '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}"
)


def message_dicts(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """Messages as the template sees them; text parts are joined, other parts refused."""
    result = []
    for i, message in enumerate(messages):
        content = message.content
        if isinstance(content, list):
            if any(part.type != "text" or part.text is None for part in content):
                raise bad_request("only text content parts are supported", f"messages.{i}.content")
            content = "".join(part.text for part in content)
        role = "system" if message.role == "developer" else message.role
        result.append({"role": role, "content": content or ""})
    return result


def render_chat(tokenizer, messages: list[ChatMessage], add_generation_prompt: bool = True) -> str:
    """The prompt text; template errors (e.g. a role the template refuses) are 400s."""
    template = getattr(tokenizer, "chat_template", None) or FALLBACK_CHAT_TEMPLATE
    try:
        return tokenizer.apply_chat_template(
            message_dicts(messages),
            chat_template=template,
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
        )
    except (ValueError, TypeError, KeyError) as exc:
        raise bad_request(
            f"the chat template could not render the messages: {exc}", "messages"
        ) from exc
    except Exception as exc:  # jinja2's TemplateError and raise_exception()
        if type(exc).__module__.startswith("jinja2"):
            raise bad_request(f"the chat template refused the messages: {exc}", "messages") from exc
        raise
