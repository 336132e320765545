"""Server-sent events: each chunk as one event, an error as an event, then ``[DONE]``."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator

import anyio

from gatemix.server.errors import APIError, internal_error

logger = logging.getLogger(__name__)

SSE_DONE = "data: [DONE]\n\n"


def sse(payload: str | dict) -> str:
    """One server-sent event."""
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


async def sse_stream(events: AsyncIterator[str], metrics) -> AsyncIterator[str]:
    """The events framed, then ``[DONE]``.

    The status line is long gone when an error happens mid-stream, so the error goes
    out as an event with its OpenAI error body (past the request's deadline: its 504),
    counted in ``metrics`` (``GateMetrics``) like any other error response.
    """
    try:
        async for event in events:
            yield sse(event)
    except APIError as exc:
        metrics.observe_error(int(exc.status_code))
        yield sse(exc.to_response().model_dump_json())
    except Exception as exc:
        logger.exception("error while streaming")
        error = internal_error(exc)
        metrics.observe_error(int(error.status_code))
        yield sse(error.to_response().model_dump_json())
    finally:
        with anyio.CancelScope(shield=True):
            await events.aclose()
    yield SSE_DONE
