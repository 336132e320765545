"""vLLM's per-token logprobs -> the OpenAI completions and chat logprobs objects.

vLLM gives, per position, a dict ``token id -> Logprob(logprob, rank,
decoded_token)`` holding the top-k tokens and the chosen one. The composite
model's "logits" are the mixture's log-probs, so these are the mixture's
(vLLM's default ``raw_logprobs`` mode: before temperature and penalties).
"""

from __future__ import annotations

from collections.abc import Sequence

from gatemix.server.protocol import (
    ChatChoiceLogprobs,
    ChatTokenLogprob,
    CompletionLogProbs,
    PromptLogprob,
    TopLogprob,
)

# JSON has no -inf; OpenAI and vLLM send this floor instead.
LOGPROB_FLOOR = -9999.0


def _token_text(token_id: int, logprob, tokenizer, as_token_id: bool = False) -> str:
    """The token as its text, or (vLLM's ``return_tokens_as_token_ids``) as ``token_id:<id>``:
    tokens that decode alike, such as partial UTF-8, stay apart."""
    if as_token_id:
        return f"token_id:{token_id}"
    decoded = getattr(logprob, "decoded_token", None)
    return decoded if decoded is not None else tokenizer.decode([token_id])


def _top(position: dict, num_top: int) -> list[tuple[int, object]]:
    """The position's top ``num_top`` entries, best first."""
    ranked = sorted(
        position.items(), key=lambda item: item[1].rank if item[1].rank is not None else 1 << 30
    )
    return [(token_id, logprob) for token_id, logprob in ranked if (logprob.rank or 0) <= num_top][
        :num_top
    ]


def completion_logprobs(
    token_ids: Sequence[int],
    positions: Sequence[dict | None],
    num_top: int,
    tokenizer,
    initial_offset: int = 0,
    as_token_ids: bool = False,
) -> CompletionLogProbs:
    """``positions[i]`` scores ``token_ids[i]``; None (the first prompt token) has no score.

    ``text_offset`` counts characters from ``initial_offset`` (the length of the
    text before these tokens, e.g. the echoed prompt or earlier stream chunks).
    """
    result = CompletionLogProbs()
    offset = initial_offset
    for token_id, position in zip(token_ids, positions):
        if position is None:
            token = _token_text(token_id, None, tokenizer, as_token_ids)
            result.token_logprobs.append(None)
            result.top_logprobs.append(None)
        else:
            chosen = position[token_id]
            token = _token_text(token_id, chosen, tokenizer, as_token_ids)
            result.token_logprobs.append(max(chosen.logprob, LOGPROB_FLOOR))
            top_logprobs: dict[str, float] = {}
            for top_id, top in _top(position, num_top):
                # Tokens that decode alike (e.g. partial UTF-8) share a key; the best one keeps it.
                top_logprobs.setdefault(
                    _token_text(top_id, top, tokenizer, as_token_ids), max(top.logprob, LOGPROB_FLOOR)
                )
            result.top_logprobs.append(top_logprobs)
        result.tokens.append(token)
        result.text_offset.append(offset)
        offset += len(token)
    return result


def chat_logprobs(
    token_ids: Sequence[int], positions: Sequence[dict], num_top: int, tokenizer
) -> ChatChoiceLogprobs:
    content = []
    for token_id, position in zip(token_ids, positions):
        chosen = position[token_id]
        token = _token_text(token_id, chosen, tokenizer)
        top = []
        for top_id, top_logprob in _top(position, num_top):
            text = _token_text(top_id, top_logprob, tokenizer)
            top.append(
                TopLogprob(
                    token=text,
                    logprob=max(top_logprob.logprob, LOGPROB_FLOOR),
                    bytes=list(text.encode()),
                )
            )
        content.append(
            ChatTokenLogprob(
                token=token,
                logprob=max(chosen.logprob, LOGPROB_FLOOR),
                bytes=list(token.encode()),
                top_logprobs=top,
            )
        )
    return ChatChoiceLogprobs(content=content)


def prompt_logprobs(
    prompt_ids: Sequence[int], positions: Sequence[dict | None] | None, num_top: int | None
) -> list[dict[int, PromptLogprob] | None] | None:
    """vLLM's ``prompt_logprobs`` shape: per prompt token, its own entry and the top ``num_top``.

    The engine may have scored more alternatives (for ``echo`` with a larger
    ``logprobs``); the extra ones are dropped. None when not asked for.
    """
    if num_top is None or positions is None:
        return None
    result: list[dict[int, PromptLogprob] | None] = []
    for token_id, position in zip(prompt_ids, positions):
        if position is None:
            result.append(None)
            continue
        result.append({
            top_id: PromptLogprob(
                logprob=max(top.logprob, LOGPROB_FLOOR), rank=top.rank, decoded_token=top.decoded_token
            )
            for top_id, top in position.items()
            if top_id == token_id or (top.rank is not None and top.rank <= num_top)
        })
    return result
