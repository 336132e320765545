"""HTTP only: fetch the handler from ``app.state``, call it, map the result to a response.

Errors are raised (``APIError``) and turned into OpenAI error bodies by
``gatemix.server.errors``; nothing here builds an error body itself.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Awaitable
from http import HTTPStatus

import anyio
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import StreamingResponse
from gatemix.server.errors import APIError, invalid_api_key
from gatemix.server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelList,
)
from pydantic import BaseModel

CLIENT_CLOSED_REQUEST = 499  # nginx's code; nobody reads it, the client is gone

ERROR_RESPONSES = {
    code: {"model": ErrorResponse}
    for code in (
        HTTPStatus.BAD_REQUEST,
        HTTPStatus.UNAUTHORIZED,
        HTTPStatus.NOT_FOUND,
        HTTPStatus.INTERNAL_SERVER_ERROR,
    )
}


async def require_api_key(request: Request) -> None:
    """With keys configured, ``Authorization: Bearer <key>`` must carry one of them."""
    keys = request.app.state.settings.api_keys
    if not keys:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise invalid_api_key(provided=bool(header))
    if not any(secrets.compare_digest(token.encode(), key.encode()) for key in keys):
        raise invalid_api_key(provided=True)


router = APIRouter()
v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], responses=ERROR_RESPONSES)


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
async def list_models(raw_request: Request) -> ModelList:
    return raw_request.app.state.models.model_list()


@v1.post(
    "/completions",
    response_model=CompletionResponse,
    responses={HTTPStatus.OK.value: {"content": {"text/event-stream": {}}}},
)
async def create_completion(request: CompletionRequest, raw_request: Request) -> Response:
    handler = raw_request.app.state.serving_completion
    return to_response(await run_cancellable(handler.create_completion(request), raw_request))


@v1.post(
    "/chat/completions",
    response_model=ChatCompletionResponse,
    responses={HTTPStatus.OK.value: {"content": {"text/event-stream": {}}}},
)
async def create_chat_completion(request: ChatCompletionRequest, raw_request: Request) -> Response:
    handler = raw_request.app.state.serving_chat
    return to_response(await run_cancellable(handler.create_chat_completion(request), raw_request))


@router.get("/health")
async def health(raw_request: Request) -> dict:
    """200 while the engine runs, with the request counts (a leak check for tests and ops)."""
    state = raw_request.app.state
    if state.engine.errored:
        raise APIError(
            HTTPStatus.SERVICE_UNAVAILABLE, "the engine has stopped", error_type="server_error"
        )
    core = state.serving_core
    return {
        "status": "ok",
        "requests_waiting": core.waiting,
        "requests_running": core.running,
        "requests_aborted": core.aborted,
        "engine_unfinished_requests": state.engine.get_num_unfinished_requests(),
    }


@router.get("/metrics")
async def metrics(raw_request: Request) -> Response:
    body, content_type = raw_request.app.state.metrics.render()
    return Response(content=body, media_type=content_type)


router.include_router(v1)
