"""The OpenAPI document, with the limits this server really enforces.

FastAPI's document describes the pydantic models; the limits that depend on
the settings or the served model are written in here, so that a request the
document calls valid is never refused for a limit it did not state: ``n``,
the stop count, ``logprobs``, ``max_tokens``, the prompt count, token ids below
the vocabulary, the model names (in bodies and in ``/v1/models/{model}``) and
experts, the body size and, with keys configured, the bearer security. What no
JSON Schema can state (the prompt and ``max_tokens`` together within the
context; ``min_tokens <= max_tokens``; a grammar that compiles) is in the
fields' descriptions.
"""

from __future__ import annotations

import json
import warnings

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from gatemix.server.responses_conversation import REFUSED_FIELDS

_GENERATION = {
    "CompletionRequest": "/v1/completions",
    "ChatCompletionRequest": "/v1/chat/completions",
    "ResponsesRequest": "/v1/responses",
}
# Input items, parts and tools of types the server refuses by name (protocol_responses.py):
# FastAPI lists them, though no schema refers to them.
_UNREFERENCED = ("OtherItem", "OtherPart", "OtherTool")
_GUARDED_PREFIXES = ("/v1/", "/tokenize", "/detokenize", "/tokenizer_info")


def openapi_document(app: FastAPI) -> dict:
    """``app.openapi``: built once the engine runs (the vocabulary and names are known)."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    with warnings.catch_warnings():  # /ping's two methods share a name; told apart below
        warnings.simplefilter("ignore")
        document = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
    for method, operation in document["paths"]["/ping"].items():
        operation["operationId"] = f"ping_{method}"
    settings = app.state.settings
    if not settings.admin_keys:  # the admin API is off: it answers 403 to everyone
        document["paths"].pop("/admin/gate", None)
    core = getattr(app.state, "serving_core", None)
    _document_body_limit(document, settings.max_body_bytes)
    if settings.api_keys:
        _document_security(document)
    schemas = document["components"]["schemas"]
    for name in _UNREFERENCED:
        schemas.pop(name, None)
    for name in _GENERATION:
        _document_request_limits(schemas[name], settings, core)
    _document_refused(schemas["ResponsesRequest"], REFUSED_FIELDS)
    if core is not None:
        _document_mixture(schemas["MixtureRequest"], core.models.expert_names)
        for name in ("TokenizeCompletionRequest", "TokenizeChatRequest", "DetokenizeRequest"):
            _document_model(schemas[name], core)
        _document_model_path(document["paths"]["/v1/models/{model}"]["get"], core)
        _token_ids_below(schemas["DetokenizeRequest"]["properties"]["tokens"], core.vocab_size)
        if not app.state.serving_chat.tools.supported:
            _document_no_tools(schemas, app.state.serving_chat.tools.why_not)
        app.openapi_schema = document  # complete: cache it
    _integer_bounds(document)
    return document


def _document_body_limit(document: dict, max_body_bytes: int) -> None:
    for path in document["paths"].values():
        for operation in path.values():
            if "requestBody" in operation:
                operation["requestBody"]["x-max-body-bytes"] = max_body_bytes
                operation["requestBody"]["description"] = (
                    f"JSON, at most {max_body_bytes} bytes (a larger body is answered 413)"
                )


def _document_security(document: dict) -> None:
    document["components"].setdefault("securitySchemes", {})["bearer"] = {
        "type": "http",
        "scheme": "bearer",
        "description": "one of the server's API keys",
    }
    for route, path in document["paths"].items():
        if route.startswith(_GUARDED_PREFIXES):
            for operation in path.values():
                operation["security"] = [{"bearer": []}]


def _document_request_limits(schema: dict, settings, core) -> None:
    properties = schema["properties"]
    if "n" in properties:
        properties["n"]["maximum"] = settings.max_n
    for branch in properties["seed"]["anyOf"]:  # FastAPI's document holds bounds as floats
        if branch.get("type") == "integer":
            branch.update({"minimum": -(2**63), "maximum": 2**63 - 1})
    for name in ("logprobs", "top_logprobs", "prompt_logprobs"):
        if name in properties:
            _set_maximum(properties[name], settings.max_logprobs)
    for branch in properties["stop"].get("anyOf", []):
        if branch.get("type") == "array":
            branch["maxItems"] = settings.max_stop
    properties["stop"]["description"] = f"at most {settings.max_stop} non-empty strings"
    if "prompt" in properties:
        for branch in properties["prompt"]["anyOf"]:
            if branch.get("type") == "array" and branch["items"].get("type") != "integer":
                branch["maxItems"] = settings.max_prompts
    if core is None:
        return
    context = core.max_model_len
    limit = min(context - 1, settings.max_output_tokens, settings.max_tokens_limit or context)
    for name in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        if name in properties:
            _set_maximum(properties[name], limit)
            properties[name]["description"] = (
                f"with the prompt's tokens, at most {context} (the context); "
                f"prompts x n x {name} at most {settings.max_output_tokens}; "
                "at least min_tokens"
            )
    _document_model(schema, core)
    for name in ("prompt", "stop_token_ids", "allowed_token_ids"):
        if name in properties:
            _token_ids_below(properties[name], core.vocab_size)
    for branch in properties["logit_bias"]["anyOf"]:
        if branch.get("type") == "object":
            branch["patternProperties"] = {_integers_up_to(core.vocab_size - 1): {
                "type": "number", "minimum": -100, "maximum": 100}}
            branch["additionalProperties"] = False
    properties["logit_bias"]["description"] = f"token id (below {core.vocab_size}) -> bias"


def _document_refused(schema: dict, refused: dict[str, tuple[tuple, str]]) -> None:
    """Fields the server refuses: only the values that change nothing (or null) are valid."""
    for name, (harmless, why) in refused.items():
        schema["properties"][name] = {
            "anyOf": [*({"const": value} for value in harmless), {"type": "null"}],
            "description": f"not supported ({why}): only "
            + " or ".join(json.dumps(value) for value in (*harmless, None)),
        }


def _served_names(core) -> list[str]:
    return [core.models.ensemble_name] + (
        core.models.expert_names if core.models.is_composite else []
    )


def _document_model(schema: dict, core) -> None:
    names = _served_names(core)
    model = schema["properties"]["model"]
    for branch in model.get("anyOf", [model]):
        if branch.get("type") == "string":
            branch["enum"] = names + [""]  # as in vLLM, empty (or absent) is the default model
    model["description"] = f"one of the served names; absent or empty: {names[0]}"


def _document_model_path(operation: dict, core) -> None:
    """``GET /v1/models/{model}``: a served name (any other is answered 404)."""
    parameter = next(p for p in operation["parameters"] if p["name"] == "model")
    parameter["schema"]["enum"] = _served_names(core)
    parameter["description"] = "one of the served names (GET /v1/models); any other is a 404"


def _document_mixture(schema: dict, experts: list[str]) -> None:
    properties = schema["properties"]
    for branch in properties["weights"].get("anyOf", []):
        if branch.get("type") == "object":
            branch["propertyNames"] = {"enum": list(experts)}
            branch["additionalProperties"] = {"type": "number", "minimum": 0}
            branch["minProperties"] = 1
    properties["weights"]["description"] += "; a positive sum over the chosen experts"
    for branch in properties["experts"].get("anyOf", []):
        if branch.get("type") == "array":
            branch["items"] = {"type": "string", "enum": list(experts)}
            branch["minItems"] = 1


def _document_no_tools(schemas: dict, why_not: str) -> None:
    """Without tool support: no tools, no tool messages, tool_choice none (or absent)."""
    note = f"not supported by this server ({why_not})"
    for name in ("ChatCompletionRequest", "TokenizeChatRequest"):
        tools = schemas[name]["properties"]["tools"]
        tools.update({"anyOf": [{"type": "array", "maxItems": 0}, {"type": "null"}],
                      "description": note})
    choice = schemas["ChatCompletionRequest"]["properties"]["tool_choice"]
    choice.update({"anyOf": [{"type": "string", "enum": ["none"]}, {"type": "null"}],
                   "description": f"only none: tools are {note}"})
    message = schemas["ChatMessage"]["properties"]
    message["role"]["enum"] = [role for role in message["role"]["enum"] if role != "tool"]
    message["tool_calls"].update({"anyOf": [{"type": "array", "maxItems": 0}, {"type": "null"}],
                                  "description": note})
    responses = schemas["ResponsesRequest"]["properties"]
    responses["tools"].update({"anyOf": [{"type": "array", "maxItems": 0}, {"type": "null"}],
                               "description": note})
    responses["tool_choice"].update({
        "anyOf": [{"type": "string", "enum": ["none", "auto"]}, {"type": "null"}],
        "description": f"none or auto (nothing to call): tools are {note}",
    })
    items = next(b for b in responses["input"]["anyOf"] if b.get("type") == "array")["items"]
    items["anyOf"] = [b for b in items["anyOf"] if b["$ref"].endswith("/InputMessage")]
    items["description"] = f"messages only: function calls and their outputs are {note}"


def _set_maximum(schema: dict, maximum: int) -> None:
    for branch in schema.get("anyOf", [schema]):
        if branch.get("type") == "integer":
            branch["maximum"] = maximum


def _token_ids_below(schema: dict, vocab_size: int) -> None:
    """Every integer that is a token id, however deep in arrays, gets ``maximum``."""
    if schema.get("type") == "integer":
        schema["maximum"] = vocab_size - 1
    for key in ("anyOf", "oneOf"):
        for branch in schema.get(key, []):
            _token_ids_below(branch, vocab_size)
    if "items" in schema:
        _token_ids_below(schema["items"], vocab_size)


def _integers_up_to(limit: int) -> str:
    """A regex for the decimal integers 0..``limit`` (no leading zeros): token-id keys."""
    digits = str(limit)
    parts = ["0"]
    if len(digits) > 1:
        parts.append(f"[1-9][0-9]{{0,{len(digits) - 2}}}")  # the shorter numbers
    for i, digit in enumerate(map(int, digits)):  # as long as limit: at most it, digit by digit
        low = 1 if i == 0 else 0
        rest = len(digits) - i - 1
        if rest == 0 and digit >= low:
            parts.append(f"{digits[:i]}[{low}-{digit}]")
        elif rest > 0 and digit > low:
            parts.append(f"{digits[:i]}[{low}-{digit - 1}][0-9]{{{rest}}}")
    return "^(" + "|".join(parts) + ")$"


def _integer_bounds(schema) -> None:
    """pydantic writes ``ge=0`` on an int as ``minimum: 0.0``; an integer's bounds are integers
    (a fuzzer that sends the bound as it reads it would send 0.0, which a strict int refuses)."""
    if isinstance(schema, dict):
        if schema.get("type") == "integer":
            for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
                value = schema.get(key)
                if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
                    schema[key] = int(value)  # larger ones are not exact as floats: set below
        for value in schema.values():
            _integer_bounds(value)
    elif isinstance(schema, list):
        for value in schema:
            _integer_bounds(value)
