"""HTTP only: fetch the handler from ``app.state``, call it, map the result to a response.

Errors are raised (``APIError``) and turned into OpenAI error bodies by
``gatemix.server.errors``; nothing here builds an error body itself. The
statuses each route can answer are declared, so that the OpenAPI document
lists them all (``openapi.py`` adds the limits that depend on the settings).
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Awaitable
from http import HTTPStatus
from typing import Annotated

import anyio
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import PlainTextResponse, StreamingResponse
from pydantic import BaseModel

from gatemix import __version__
from gatemix.server.errors import admin_api_off, engine_dead, invalid_api_key
from gatemix.server.gate_admin import GateReloadRequest, GateReloadResponse
from gatemix.server.limits import Ticket
from gatemix.server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
)
from gatemix.server.protocol_responses import ResponsesRequest, ResponsesResponse
from gatemix.server.tokenize_protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    LoadResponse,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfoResponse,
    VersionResponse,
)

CLIENT_CLOSED_REQUEST = 499  # nginx's code; nobody reads it, the client is gone


def _errors(*codes: HTTPStatus) -> dict:
    responses: dict = {code.value: {"model": ErrorResponse} for code in codes}
    if HTTPStatus.TOO_MANY_REQUESTS in codes:
        responses[HTTPStatus.TOO_MANY_REQUESTS.value]["headers"] = {
            "Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}
        }
    return responses


S = HTTPStatus
GUARDED = _errors(S.UNAUTHORIZED, S.INTERNAL_SERVER_ERROR)
TAKES_BODY = _errors(S.BAD_REQUEST, S.NOT_FOUND, S.REQUEST_ENTITY_TOO_LARGE)
GENERATES = {
    **TAKES_BODY,
    **_errors(S.TOO_MANY_REQUESTS, S.SERVICE_UNAVAILABLE, S.GATEWAY_TIMEOUT),
    # A stream: each server-sent event's data is one chunk as JSON, then "[DONE]".
    S.OK.value: {"content": {"text/event-stream": {"schema": {
        "type": "object",
        "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
        "required": ["data"],
    }}}},
}


async def require_api_key(request: Request) -> None:
    """With keys configured, ``Authorization: Bearer <key>`` must carry one of them."""
    keys = request.app.state.settings.api_keys
    if keys:
        _check_bearer(request, keys)


async def require_admin_key(request: Request) -> None:
    """The admin API takes its own keys (``--admin-key``) and is off without one."""
    keys = request.app.state.settings.admin_keys
    if not keys:
        raise admin_api_off()
    _check_bearer(request, keys)


def _check_bearer(request: Request, keys: list[str]) -> None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise invalid_api_key(provided=bool(header))
    if not any(secrets.compare_digest(token.encode(), key.encode()) for key in keys):
        raise invalid_api_key(provided=True)


def admission_ticket(request: Request) -> Ticket:
    """This request's handle on the admission count; the limits middleware releases it."""
    return Ticket(getattr(request.app.state, "admission", None), request.scope.setdefault("state", {}))


TicketDep = Annotated[Ticket, Depends(admission_ticket)]

router = APIRouter()
v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], responses=GUARDED)
# vLLM's tokenizer endpoints sit at the root, as in vLLM; with keys set they need one too.
tokenizer = APIRouter(dependencies=[Depends(require_api_key)], responses=GUARDED)


class AbortingStreamingResponse(StreamingResponse):
    """Closes its event generator however the response ends, so that a client that
    disconnects aborts its engine requests at once, not when the generator is collected."""

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def run_cancellable(handler_call: Awaitable, request: Request):
    """Await the handler; if the client disconnects first, cancel it (aborting its engine
    requests) and return None. A stream is returned at once and watched by its response."""
    handler = asyncio.ensure_future(handler_call)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({handler, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not handler.done():
            handler.cancel()
            await asyncio.gather(handler, return_exceptions=True)
    return None if handler.cancelled() else handler.result()


def to_response(result: BaseModel | AsyncIterator[str] | None) -> Response:
    if result is None:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    if isinstance(result, BaseModel):
        return Response(content=result.model_dump_json(), media_type="application/json")
    return AbortingStreamingResponse(result, media_type="text/event-stream")


@v1.get("/models", response_model=ModelList)
# "/v1/models/" stays the list (as FastAPI's slash redirect made it), not an empty name's card.
@v1.get("/models/", response_model=ModelList, include_in_schema=False)
async def list_models(raw_request: Request) -> ModelList:
    return raw_request.app.state.models.model_list()


# `path`: a served name may hold a slash ("org/model"), which clients send percent-encoded.
@v1.get("/models/{model:path}", response_model=ModelCard, responses=_errors(S.NOT_FOUND))
async def retrieve_model(model: str, raw_request: Request) -> ModelCard:
    """OpenAI's model retrieval: the name's card from the list, extensions included."""
    return raw_request.app.state.models.model_card(model)


@v1.post("/completions", response_model=CompletionResponse, responses=GENERATES)
async def create_completion(
    request: CompletionRequest, raw_request: Request, ticket: TicketDep
) -> Response:
    handler = raw_request.app.state.serving_completion
    return to_response(
        await run_cancellable(handler.create_completion(request, ticket), raw_request)
    )


@v1.post("/chat/completions", response_model=ChatCompletionResponse, responses=GENERATES)
async def create_chat_completion(
    request: ChatCompletionRequest, raw_request: Request, ticket: TicketDep
) -> Response:
    handler = raw_request.app.state.serving_chat
    return to_response(
        await run_cancellable(handler.create_chat_completion(request, ticket), raw_request)
    )


@v1.post("/responses", response_model=ResponsesResponse, responses=GENERATES)
async def create_response(
    request: ResponsesRequest, raw_request: Request, ticket: TicketDep
) -> Response:
    """OpenAI's Responses API (text, function tools), served by the chat path."""
    handler = raw_request.app.state.serving_responses
    return to_response(await run_cancellable(handler.create_response(request, ticket), raw_request))


@v1.get("/responses/{response_id}", response_model=ResponsesResponse, responses=_errors(S.NOT_FOUND))
async def retrieve_response(response_id: str, raw_request: Request) -> Response:
    """A stored response (``store`` true, the default); any other id is a 404."""
    return to_response(raw_request.app.state.serving_responses.retrieve_response(response_id))


@tokenizer.post("/tokenize", response_model=TokenizeResponse, responses=TAKES_BODY)
async def tokenize(request: TokenizeRequest, raw_request: Request) -> TokenizeResponse:
    return raw_request.app.state.serving_tokenization.tokenize(request)


@tokenizer.post("/detokenize", response_model=DetokenizeResponse, responses=TAKES_BODY)
async def detokenize(request: DetokenizeRequest, raw_request: Request) -> DetokenizeResponse:
    return raw_request.app.state.serving_tokenization.detokenize(request)


@tokenizer.get("/tokenizer_info", response_model=TokenizerInfoResponse)
async def tokenizer_info(raw_request: Request) -> TokenizerInfoResponse:
    return raw_request.app.state.serving_tokenization.tokenizer_info()


class HealthResponse(BaseModel):
    status: str
    requests_waiting: int
    requests_running: int
    requests_aborted: int
    requests_admitted: int
    engine_unfinished_requests: int


@router.get("/health", response_model=HealthResponse, responses=_errors(S.SERVICE_UNAVAILABLE))
async def health(raw_request: Request) -> HealthResponse:
    """200 while the engine runs, with the request counts (a leak check for tests and ops)."""
    state = raw_request.app.state
    if state.engine.errored:
        raise engine_dead()
    counts = state.serving_core.recorder
    return HealthResponse(
        status="ok",
        requests_waiting=counts.waiting,
        requests_running=counts.running,
        requests_aborted=counts.aborted,
        requests_admitted=state.admission.admitted,
        engine_unfinished_requests=state.engine.get_num_unfinished_requests(),
    )


PING = {S.OK.value: {"description": "the engine runs"}, **_errors(S.SERVICE_UNAVAILABLE)}


@router.api_route("/ping", methods=["GET", "POST"], response_class=Response, responses=PING)
async def ping(raw_request: Request) -> Response:
    """vLLM's (and SageMaker's) liveness check: an empty 200 while the engine runs."""
    if raw_request.app.state.engine.errored:
        raise engine_dead()
    return Response(status_code=S.OK)


@router.get("/load", response_model=LoadResponse)
async def load(raw_request: Request) -> LoadResponse:
    """vLLM's load metric, always on here (vLLM's needs --enable-server-load-tracking). It counts
    engine requests, as admission does (``n=4`` is 4), where vLLM counts HTTP requests."""
    return LoadResponse(server_load=raw_request.app.state.admission.admitted)


@router.get("/version", response_model=VersionResponse)
async def version() -> VersionResponse:
    # Importing vllm takes seconds (its package imports torch): paid on the first /version only.
    from vllm.version import __version__ as vllm_version

    return VersionResponse(version=vllm_version, gatemix_version=__version__)


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    responses={S.OK.value: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
)
async def metrics(raw_request: Request) -> Response:
    """Prometheus' text exposition format."""
    body, content_type = raw_request.app.state.metrics.render()
    return Response(content=body, media_type=content_type)


admin = APIRouter(
    prefix="/admin", dependencies=[Depends(require_admin_key)],
    responses=_errors(S.UNAUTHORIZED, S.FORBIDDEN, S.BAD_REQUEST, S.INTERNAL_SERVER_ERROR),
)


@admin.post("/gate", response_model=GateReloadResponse)
async def reload_gate(request: GateReloadRequest, raw_request: Request) -> GateReloadResponse:
    """Serve another gate from now on, without restarting the experts (``server/gate_admin.py``)."""
    return await raw_request.app.state.gate_admin.reload(request.path)


router.include_router(v1)
router.include_router(tokenizer)
router.include_router(admin)
