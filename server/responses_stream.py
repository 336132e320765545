"""The events of one streamed response, numbered, with the output items they build.

The order is OpenAI's: ``response.created`` and ``response.in_progress``; per
output item ``response.output_item.added``, its parts and deltas, then
``response.output_item.done``; last ``response.completed`` (or
``response.incomplete`` when ``max_output_tokens`` ran out) with the whole
response. A text item is opened by its first text; a function call by the
parser's first delta of it (which closes an open text item first); text after
a call opens a new text item. Each event leaves as a server-sent event named
by its type (``event: response.output_text.delta``), with no ``[DONE]``.
"""

from __future__ import annotations

import uuid

from gatemix.server.errors import APIError
from gatemix.server.protocol import ChatTokenLogprob, MixtureReport
from gatemix.server.protocol_responses import (
    ArgumentsDeltaEvent,
    ArgumentsDoneEvent,
    ContentPartEvent,
    ErrorEvent,
    FunctionToolCall,
    OutputItemEvent,
    OutputMessage,
    OutputText,
    ResponseEvent,
    ResponseLifecycleEvent,
    ResponsesResponse,
    TextDeltaEvent,
    TextDoneEvent,
)
from gatemix.server.protocol_structured import ToolCallDelta


def new_item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def sse_event(event: ResponseEvent) -> str:
    """One server-sent event, named by the event's type as OpenAI's stream names them."""
    return f"event: {event.type}\ndata: {event.model_dump_json()}\n\n"


class ResponseEvents:
    """One stream's events, as SSE text, in order; ``output`` is the response's items so far."""

    def __init__(self, shell: ResponsesResponse, *, first_call_only: bool) -> None:
        self.shell = shell  # the response as created: in progress, no output
        self.first_call_only = first_call_only  # parallel_tool_calls false
        self.sequence = 0
        self.output: list[OutputMessage | FunctionToolCall] = []
        self.message: OutputMessage | None = None  # the text item open now
        self.calls: dict[int, FunctionToolCall] = {}  # the parser's call index -> its item

    def _emit(self, cls: type[ResponseEvent], **fields) -> str:
        # Serialized at once: the items are changed in place by later deltas.
        event = cls(sequence_number=self.sequence, **fields)
        self.sequence += 1
        return sse_event(event)

    def _item_event(self, kind: str, item) -> str:
        index = self.output.index(item)
        return self._emit(OutputItemEvent, type=f"response.output_item.{kind}",
                          output_index=index, item=item)

    def start(self) -> list[str]:
        return [
            self._emit(ResponseLifecycleEvent, type=kind, response=self.shell)
            for kind in ("response.created", "response.in_progress")
        ]

    def text(
        self, delta: str, logprobs: list[ChatTokenLogprob], mixture: MixtureReport | None
    ) -> list[str]:
        events = [] if self.message is not None else self._open_message()
        part = self.message.content[0]
        part.text += delta
        part.logprobs += logprobs
        events.append(self._emit(
            TextDeltaEvent, item_id=self.message.id, output_index=self.output.index(self.message),
            content_index=0, delta=delta, logprobs=logprobs, mixture=mixture,
        ))
        return events

    def _open_message(self) -> list[str]:
        self.message = OutputMessage(id=new_item_id("msg"), status="in_progress", content=[])
        self.output.append(self.message)
        added = self._item_event("added", self.message)
        self.message.content.append(OutputText(text=""))
        return [added, self._part_event("added")]

    def _part_event(self, kind: str) -> str:
        return self._emit(
            ContentPartEvent, type=f"response.content_part.{kind}", item_id=self.message.id,
            output_index=self.output.index(self.message), content_index=0,
            part=self.message.content[0],
        )

    def _close_message(self, status: str) -> list[str]:
        if self.message is None:
            return []
        part = self.message.content[0]
        events = [self._emit(
            TextDoneEvent, item_id=self.message.id, output_index=self.output.index(self.message),
            content_index=0, text=part.text, logprobs=part.logprobs,
        ), self._part_event("done")]
        self.message.status = status
        events.append(self._item_event("done", self.message))
        self.message = None
        return events

    def tool_calls(self, deltas: list[ToolCallDelta]) -> list[str]:
        events: list[str] = []
        for delta in deltas:
            if self.first_call_only and delta.index > 0:
                continue
            function = delta.function
            item = self.calls.get(delta.index)
            if item is None:
                events += self._close_message("completed")
                item = FunctionToolCall(
                    id=new_item_id("fc"), call_id=delta.id or new_item_id("call"),
                    name="", arguments="", status="in_progress",
                )
                item.name = (function.name if function else None) or ""
                self.calls[delta.index] = item
                self.output.append(item)
                events.append(self._item_event("added", item))
            elif function is not None and function.name and not item.name:
                item.name = function.name
            if function is not None and function.arguments:
                item.arguments += function.arguments
                events.append(self._emit(
                    ArgumentsDeltaEvent, item_id=item.id, output_index=self.output.index(item),
                    delta=function.arguments,
                ))
        return events

    def close(self, status: str) -> list[str]:
        """Close every open item with ``status``; ``output`` is then the response's whole output."""
        events = self._open_message() if not self.output else []  # as a whole response has
        events += self._close_message(status)
        for item in self.calls.values():
            item.status = status
            events.append(self._emit(
                ArgumentsDoneEvent, item_id=item.id, output_index=self.output.index(item),
                name=item.name, arguments=item.arguments,
            ))
            events.append(self._item_event("done", item))
        return events

    def done(self, response: ResponsesResponse) -> str:
        kind = "response.incomplete" if response.status == "incomplete" else "response.completed"
        return self._emit(ResponseLifecycleEvent, type=kind, response=response)

    def error(self, exc: APIError) -> str:
        return self._emit(ErrorEvent, code=exc.code, message=exc.message, param=exc.param)
