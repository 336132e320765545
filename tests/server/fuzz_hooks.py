"""Schemathesis hooks for the fuzz test: repair the cross-field rules a schema cannot state.

Loaded by ``test_openapi.py`` (``SCHEMATHESIS_HOOKS``). Every limit a JSON
Schema can state is in the server's OpenAPI document, and schemathesis holds
the server to it both ways. What no schema can state is listed in the fields'
descriptions, and repaired here, in *positive* (schema-valid) cases only, so
that a refusal of one of them is not mistaken for a refusal of valid data:

* the prompt and ``max_tokens`` together within the context (prompts are cut
  short, ``max_tokens`` kept small: also what keeps the run quick);
* ``min_tokens <= max_tokens``; ``top_logprobs`` needs ``logprobs`` (in a
  response: ``include``); a response id (``GET /v1/responses/{id}``,
  ``previous_response_id``) names a stored response, one made for them;
  ``best_of == n``; no ``prompt_logprobs`` in a stream;
* a pinned mixture gives some weight to the experts it keeps, and names
  weights for the ensemble only;
* a grammar, a regex or a JSON schema must compile (the fuzzer's are random); a
  response's ``text.format`` other than text leaves out ``structured_outputs``;
* ``bad_words`` take at most 1024 tokens together.

Negative cases are left alone: the server must refuse every one of them.
"""

from __future__ import annotations

import requests
import schemathesis

PROMPT_CHARS = 32  # byte-level BPE: at most 4 tokens a character, so 129 tokens with BOS
# Every response shape (streams, stops, log-probs, n choices, a length finish) shows within 4
# tokens, and decoding is most of what the server does for the fuzzer: 16 took twice as long.
MAX_TOKENS = 4
MAX_PROMPTS = 4
MAX_MESSAGES = 4
ENSEMBLE = "gatemix-test"


@schemathesis.hook
def before_call(context, case, kwargs):
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive:
        return
    path = case.operation.path
    if path == "/v1/responses/{response_id}":
        case.path_parameters = {**(case.path_parameters or {}), "response_id": _stored_response_id(case)}
    if not isinstance(case.body, dict):
        return
    if path == "/v1/completions":
        _repair_prompt(case.body)
        _repair_generation(case.body, "max_tokens")
    elif path == "/v1/chat/completions":
        _repair_messages(case.body)
        _repair_generation(case.body, "max_completion_tokens")
        if case.body.get("top_logprobs") is not None:
            case.body["logprobs"] = True
    elif path == "/v1/responses":
        _repair_responses(case.body)
        if case.body.get("previous_response_id") is not None:
            case.body["previous_response_id"] = _stored_response_id(case)


_STORED: list[str] = []  # the id of the one response made for the cases that name one


def _stored_response_id(case) -> str:
    """A response the server keeps: what a GET, or a ``previous_response_id``, must name."""
    if not _STORED:
        schema = case.operation.schema
        response = requests.post(
            f"{schema.get_base_url().rstrip('/')}/v1/responses",
            json={"input": "Hi", "max_output_tokens": 1},
            headers=schema.config.headers_for(operation=case.operation),
            timeout=60,
        )
        _STORED.append(response.json()["id"])
    return _STORED[0]


def _repair_prompt(body: dict) -> None:
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        body["prompt"] = prompt[:PROMPT_CHARS]
    elif isinstance(prompt, list) and prompt:
        prompt = prompt[:MAX_PROMPTS]
        if isinstance(prompt[0], str):
            body["prompt"] = [text[:PROMPT_CHARS] for text in prompt]
        elif isinstance(prompt[0], list):
            body["prompt"] = [ids[: PROMPT_CHARS * 2] for ids in prompt]
        else:
            body["prompt"] = prompt[: PROMPT_CHARS * 2]


def _repair_messages(body: dict) -> None:
    messages = body.get("messages") or []
    body["messages"] = messages[:MAX_MESSAGES]
    budget = PROMPT_CHARS  # for all the messages together
    for message in body["messages"]:
        content = message.get("content")
        if isinstance(content, str):
            message["content"] = content[:budget]
            budget -= len(message["content"])
        elif isinstance(content, list):
            for part in content:
                part["text"] = part.get("text", "")[:budget]
                budget -= len(part["text"])


def _repair_responses(body: dict) -> None:
    """The input (and instructions) cut short."""
    if isinstance(body.get("instructions"), str):
        body["instructions"] = body["instructions"][: PROMPT_CHARS // 2]
    if isinstance(body.get("input"), str):
        body["input"] = body["input"][: PROMPT_CHARS // 2]
    elif isinstance(body.get("input"), list):
        body["input"] = body["input"][:MAX_MESSAGES]
        budget = PROMPT_CHARS // 2
        for item in body["input"]:
            for key in ("content", "output", "arguments"):
                value = item.get(key)
                if isinstance(value, str):
                    item[key] = value[:budget]
                    budget -= len(item[key])
                elif isinstance(value, list):
                    for part in value:
                        part["text"] = part.get("text", "")[:budget]
                        budget -= len(part["text"])
    _repair_generation(body, "max_output_tokens")
    if body.get("top_logprobs") is not None:
        body["include"] = ["message.output_text.logprobs"]
    text_format = (body.get("text") or {}).get("format")
    if isinstance(text_format, dict) and text_format.get("type") != "text":
        body.pop("structured_outputs", None)  # one constraint: text.format or structured_outputs
    if isinstance(text_format, dict) and text_format.get("type") == "json_schema":
        text_format["schema"] = {
            "type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
        }


def _repair_generation(body: dict, max_name: str) -> None:
    for name in ("max_tokens", max_name):
        if body.get(name) is not None:
            body[name] = min(body[name], MAX_TOKENS)
    if body.get("max_tokens") is None and body.get(max_name) is None:
        body[max_name] = MAX_TOKENS  # "the rest of the context" would be slow, not wrong
    limit = min(value for value in (body.get("max_tokens"), body.get(max_name)) if value is not None)
    if body.get("min_tokens"):
        body["min_tokens"] = min(body["min_tokens"], limit)
    if body.get("best_of") is not None:
        body["best_of"] = body.get("n", 1)
    if body.get("stream") and body.get("prompt_logprobs") is not None:
        del body["prompt_logprobs"]
    if body.get("bad_words"):
        body["bad_words"] = [word.strip()[:8] for word in body["bad_words"][:4]]
    _repair_mixture(body)
    _repair_constraints(body)


def _repair_mixture(body: dict) -> None:
    mixture = body.get("mixture")
    if not isinstance(mixture, dict):
        return
    if body.get("model") not in (None, "", ENSEMBLE):  # an expert's name: its gate is fixed
        mixture.pop("weights", None)
        mixture.pop("experts", None)
        return
    weights = mixture.get("weights")
    if isinstance(weights, dict) and weights:
        kept = mixture.get("experts") or list(weights)
        weights[kept[0]] = weights.get(kept[0], 0.0) + 1.0


def _repair_constraints(body: dict) -> None:
    constraint = body.get("structured_outputs")
    if isinstance(constraint, dict):
        options = {k: v for k, v in constraint.items() if k.startswith("disable_")}
        body["structured_outputs"] = {**options, "regex": "[a-z]{1,8}"}
    response_format = body.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") == "json_schema":
        json_schema = response_format.get("json_schema") or {"name": "fuzz"}
        json_schema["schema"] = {
            "type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
        }
        response_format["json_schema"] = json_schema
