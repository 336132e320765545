"""The server's one error type, and the one place that turns errors into HTTP responses.

Serving code raises ``APIError``; FastAPI's own errors (bad JSON, wrong types,
unknown routes) and anything unexpected are caught here too. Every error
leaves as an OpenAI error body ``{"error": {"message", "type", "param",
"code"}}`` and is counted in the metrics.
"""

from __future__ import annotations

import logging
import re
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from gatemix.server.protocol import ErrorInfo, ErrorResponse

logger = logging.getLogger(__name__)

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "server_error",
    504: "timeout_error",
}

# What pydantic adds to an error's location for a union member or a validator:
# list[int], literal['a'], function-after[...], str, a model's class name.
_UNION_TAG = re.compile(r"[a-z-]*\[.*\]|str|int|float|bool|none|constrained-\w+|[A-Z]\w*")


class APIError(Exception):
    """A request that ends in an HTTP error; ``message`` is shown to the client."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        error_type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.param = param
        self.code = code
        self.error_type = error_type or _ERROR_TYPES.get(status_code, "server_error")
        self.headers = headers  # e.g. Retry-After on a 429, Allow on a 405

    def to_response(self) -> ErrorResponse:
        return ErrorResponse(
            error=ErrorInfo(
                message=self.message, type=self.error_type, param=self.param, code=self.code
            )
        )


def bad_request(
    message: str, param: str | None = None, code: str | None = "invalid_value"
) -> APIError:
    return APIError(HTTPStatus.BAD_REQUEST, message, param=param, code=code)


def model_not_found(model: str) -> APIError:
    return APIError(
        HTTPStatus.NOT_FOUND,
        f"The model `{model}` does not exist or you do not have access to it.",
        param="model",
        code="model_not_found",
    )


def unsupported_field(param: str, why: str) -> APIError:
    """A request field this server cannot honour: refused, never silently ignored."""
    return APIError(
        HTTPStatus.BAD_REQUEST,
        f"`{param}` is not supported by this server: {why}",
        param=param,
        code="unsupported_parameter",
    )


def engine_dead() -> APIError:
    return APIError(
        HTTPStatus.SERVICE_UNAVAILABLE, "the engine has stopped", error_type="server_error"
    )


def admin_api_off() -> APIError:
    return APIError(
        HTTPStatus.FORBIDDEN, "The admin API is off: start the server with --admin-key.",
        code="admin_api_off", error_type="permission_error",
    )


def invalid_api_key(provided: bool) -> APIError:
    message = (
        "Incorrect API key provided."
        if provided
        else "You didn't provide an API key. Send it as `Authorization: Bearer <key>`."
    )
    return APIError(HTTPStatus.UNAUTHORIZED, message, code="invalid_api_key")


def _validation_error(exc: RequestValidationError) -> APIError:
    """FastAPI's 422 becomes OpenAI's 400, naming the first offending field."""
    errors = exc.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return bad_request(
            "We could not parse the JSON body of your request. Send valid JSON.",
            code="invalid_json",
        )
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    # In a union (prompt.list[int].0) the first member's error need not be the one meant:
    # name the field that holds the union.
    cut = next((i for i, part in enumerate(location) if _UNION_TAG.fullmatch(part)), None)
    param = ".".join(location[:cut])
    message = first.get("msg", "invalid request")
    return bad_request(
        f"{message} (param: {param or 'body'})" if param else message, param=param or None
    )


def install_error_handlers(app: FastAPI) -> None:
    """Map every error to an OpenAI error body; ``app.state.metrics`` counts them."""

    def respond(request: Request, error: APIError) -> JSONResponse:
        metrics = getattr(request.app.state, "metrics", None)
        if metrics is not None:
            metrics.observe_error(int(error.status_code))
        return JSONResponse(
            error.to_response().model_dump(),
            status_code=int(error.status_code),
            headers=error.headers,
        )

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return respond(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return respond(request, _validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        # Starlette's 405 names the allowed methods in ``Allow``; it is kept.
        error = APIError(exc.status_code, str(exc.detail), code=code, headers=exc.headers)
        return respond(request, error)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error serving %s", request.url.path)
        return respond(request, internal_error(exc))


def internal_error(exc: BaseException) -> APIError:
    return APIError(
        HTTPStatus.INTERNAL_SERVER_ERROR,
        f"The server had an error: {type(exc).__name__}: {exc}",
        error_type="server_error",
    )
