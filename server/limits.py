"""Backpressure and limits: body size (413), queue depth (429), request time (504).

``LimitsMiddleware`` is a pure ASGI middleware, outermost, because two of its
jobs must happen outside FastAPI:

* the body limit applies *before* parsing: a declared ``Content-Length`` over
  the limit is refused unread, and a chunked body is refused as soon as it
  passes the limit, so a 20 MB body is never parsed or tokenized;
* the admission count is released when the ASGI call ends, which is when the
  response has been sent, a stream included, or the client has gone. A release
  tied to a stream generator would be lost when the generator never starts.

Admission counts engine requests (choices, so ``n=4`` counts 4): the engine
runs ``max_num_seqs`` of them at once in each replica and ``max_queued_requests``
more may wait; a request that would go past that is answered 429 with ``Retry-After``
instead of queueing without bound.
"""

from __future__ import annotations

import asyncio
import logging
from http import HTTPStatus

from fastapi.responses import JSONResponse

from gatemix.server.errors import APIError, bad_request

logger = logging.getLogger(__name__)

_TICKET_KEY = "gatemix_admitted"  # in the ASGI scope's "state": the choices this request holds
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def too_many_requests(admitted: int, capacity: int, retry_after_s: int) -> APIError:
    return APIError(
        HTTPStatus.TOO_MANY_REQUESTS,
        f"The server is at capacity ({admitted} of {capacity} engine requests in flight). "
        f"Retry after {retry_after_s} s.",
        code="server_overloaded",
        headers={"Retry-After": str(retry_after_s)},
    )


def body_too_large(limit: int) -> APIError:
    return APIError(
        HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
        f"The request body is larger than this server's limit of {limit} bytes.",
        code="request_too_large",
    )


def request_timed_out(timeout_s: float) -> APIError:
    return APIError(
        HTTPStatus.GATEWAY_TIMEOUT,
        f"The request did not finish within this server's {timeout_s:g} s limit; "
        "its generation was aborted.",
        code="timeout",
    )


class Admission:
    """Engine requests admitted and not yet answered, against ``capacity``."""

    def __init__(self, capacity: int, retry_after_s: int) -> None:
        self.capacity = capacity
        self.retry_after_s = retry_after_s
        self.admitted = 0

    def admit(self, scope_state: dict, choices: int) -> None:
        """Reserve ``choices`` for this request, or raise a 429. Released by the middleware.

        A request larger than the whole capacity could never be admitted: a 400, not a 429.
        """
        if choices > self.capacity:
            raise bad_request(
                f"the request makes {choices} engine requests (prompts x n); this server admits "
                f"at most {self.capacity} at once",
                "n",
            )
        if self.admitted + choices > self.capacity:
            raise too_many_requests(self.admitted, self.capacity, self.retry_after_s)
        self.admitted += choices
        scope_state[_TICKET_KEY] = scope_state.get(_TICKET_KEY, 0) + choices

    def release(self, scope_state: dict) -> None:
        self.admitted -= scope_state.pop(_TICKET_KEY, 0)


class Ticket:
    """One HTTP request's handle on the admission count (FastAPI dependency ``TicketDep``)."""

    def __init__(self, admission: Admission | None, scope_state: dict) -> None:
        self._admission = admission
        self._state = scope_state

    def admit(self, choices: int) -> None:
        if self._admission is not None:
            self._admission.admit(self._state, choices)


class Deadline:
    """One request's time limit, from its arrival; ``None`` seconds: no limit."""

    def __init__(self, timeout_s: float | None) -> None:
        self.timeout_s = timeout_s
        loop = asyncio.get_running_loop()
        self._at = None if timeout_s is None else loop.time() + timeout_s

    def remaining(self) -> float | None:
        """Seconds left (0 once passed), or None without a limit."""
        if self._at is None:
            return None
        return max(self._at - asyncio.get_running_loop().time(), 0.0)

    def expired(self) -> APIError:
        return request_timed_out(self.timeout_s)


class LimitsMiddleware:
    """Body limit before parsing; admission release when the response ends."""

    def __init__(self, app, *, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        try:
            if scope["method"] in _BODY_METHODS:
                receive = await self._buffered_body(scope, receive, send)
                if receive is None:
                    return
            await self.app(scope, receive, send)
        finally:
            admission = getattr(scope["app"].state, "admission", None) if "app" in scope else None
            if admission is not None:
                admission.release(state)

    async def _buffered_body(self, scope, receive, send):
        """A ``receive`` that replays the body read here; None when it was refused (413)."""
        limit = self.max_body_bytes
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._refuse(scope, send, body_too_large(limit))
            return None
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left; let the app see it
                first = message
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await self._refuse(scope, send, body_too_large(limit))
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                first = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return first
            return await receive()

        return replay

    @staticmethod
    async def _refuse(scope, send, error: APIError) -> None:
        app = scope.get("app")
        metrics = getattr(app.state, "metrics", None) if app is not None else None
        if metrics is not None:
            metrics.observe_error(int(error.status_code))
        logger.info("refused %s %s: %s", scope["method"], scope["path"], error.message)
        response = JSONResponse(
            error.to_response().model_dump(),
            status_code=int(error.status_code),
            headers={"Connection": "close"},
        )

        async def no_body():
            return {"type": "http.disconnect"}

        await response(scope, no_body, send)
