"""How per-token gate weights leave the vLLM worker.

The worker knows each sampled token's gate weights; the API server needs them
for the ``mixture`` object of responses and for metrics. vLLM's output path has
no slot for them, so the worker pushes them on a side channel: a ZeroMQ PUSH
socket per destination named in the request (``trace_to``), one message per
engine step holding ``(trace_id, token_index, weights)`` records. The server
binds the PULL end (``GateTraceReceiver``) and waits, per request, until the
weights of every token it has received from the engine have arrived.

Sends never block the engine. On a GPU the step's weights are copied to the
host without waiting for the device, and a sender thread sends them once the
copy is done, so the worker's thread goes on to the next step as vLLM's async
scheduling expects. On a CPU they are on the host already and are sent at once:
there is no copy to overlap, and a thread would only wait for a core while the
server waits for the weights. With no receiver, or a full queue, the records are
dropped and counted, and the server reports the request's weights as missing
rather than stalling decoding.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import tempfile
import threading
import uuid
from collections.abc import Sequence
from typing import Protocol

import msgspec
import zmq
import zmq.asyncio

logger = logging.getLogger(__name__)

# (trace_id, token_index, gate weights over experts, the draft tokens before token_index they assume)
TraceRecord = tuple[str, int, list[float], list[int]]


class StepRecords(Protocol):
    """One sampling call's records, whose weights may still be on their way to the host."""

    copying: bool  # a device-to-host copy is still in flight: ``wait`` waits for it

    def wait(self) -> None: ...

    def records(self) -> dict[str, list[TraceRecord]]: ...


class TraceSender:
    """Worker side: non-blocking PUSH sockets, one per destination address.

    ``submit`` sends a step's records at once when they are on the host, and
    otherwise hands them to one sender thread, which waits for the copy and
    sends steps in order. A worker's steps are all on its one device, so its
    sockets are used by one thread only (ZeroMQ sockets are not thread-safe).
    """

    def __init__(self) -> None:
        self._context: zmq.Context | None = None
        self._sockets: dict[str, zmq.Socket] = {}
        self.dropped_records = 0
        self._steps: queue.SimpleQueue | None = None

    def submit(self, step: StepRecords) -> None:
        if not step.copying:
            self._send_step(step)
            return
        if self._steps is None:
            self._steps = queue.SimpleQueue()
            threading.Thread(target=self._send_steps, name="gatemix-trace-sender", daemon=True).start()
        self._steps.put(step)

    def _send_steps(self) -> None:
        while True:
            self._send_step(self._steps.get())

    def _send_step(self, step: StepRecords) -> None:
        try:
            step.wait()
            for address, records in step.records().items():
                self.send(address, records)
        except Exception:  # one bad step must not stop the trace: every later weight would be lost
            logger.exception("dropping a step of gate trace records")

    def _socket(self, address: str) -> zmq.Socket:
        if address not in self._sockets:
            if self._context is None:
                self._context = zmq.Context.instance()
            socket = self._context.socket(zmq.PUSH)
            socket.setsockopt(zmq.LINGER, 0)
            socket.setsockopt(zmq.SNDHWM, 10_000)
            socket.connect(address)
            self._sockets[address] = socket
        return self._sockets[address]

    def send(self, address: str, records: Sequence[TraceRecord]) -> None:
        if not records:
            return
        try:
            self._socket(address).send(msgspec.msgpack.encode(records), flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            self.dropped_records += len(records)


class _Trace:
    __slots__ = ("changed", "weights")

    def __init__(self) -> None:
        self.weights: dict[int, tuple[list[float], list[int]]] = {}  # index -> (weights, conditioning)
        self.changed = asyncio.Event()

    def valid(self, index: int, output_ids: list[int] | None) -> bool:
        """Whether ``index`` has weights, conditioned on the output the request really has."""
        entry = self.weights.get(index)
        if entry is None:
            return False
        conditioning = entry[1]
        return not conditioning or output_ids is None or output_ids[index - len(conditioning) : index] == conditioning


class GateTraceReceiver:
    """Server side: collects the per-token weights of registered requests.

    Records for trace ids that were never registered, or already released, are
    dropped, so a client that disconnects cannot leak memory here.
    """

    def __init__(self, address: str | None = None) -> None:
        if address is None:
            path = os.path.join(tempfile.gettempdir(), f"gatemix-trace-{uuid.uuid4().hex[:12]}.sock")
            address = f"ipc://{path}"
        self.address = address
        self._traces: dict[str, _Trace] = {}
        self._context: zmq.asyncio.Context | None = None
        self._socket: zmq.asyncio.Socket | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._context = zmq.asyncio.Context()
        self._socket = self._context.socket(zmq.PULL)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.RCVHWM, 100_000)
        self._socket.bind(self.address)
        self._task = asyncio.create_task(self._receive_loop(), name="gatemix-trace-receiver")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._socket is not None:
            self._socket.close()
        if self._context is not None:
            self._context.term()
        if self.address.startswith("ipc://"):
            try:
                os.unlink(self.address[len("ipc://"):])
            except OSError:
                pass

    async def _receive_loop(self) -> None:
        assert self._socket is not None
        # Typed: a message that is not a list of records is refused here, whole, instead of
        # raising mid-loop and ending the task (every later request's weights would go missing).
        decoder = msgspec.msgpack.Decoder(list[TraceRecord])
        while True:
            payload = await self._socket.recv()
            try:
                records = decoder.decode(payload)
            except msgspec.DecodeError:  # ValidationError (the wrong shape) included
                logger.warning("dropping an undecodable gate trace message")
                continue
            touched: set[str] = set()
            for trace_id, token_index, weights, conditioning in records:
                trace = self._traces.get(trace_id)
                if trace is not None:
                    trace.weights[token_index] = (weights, conditioning)  # a re-sampled index overwrites
                    touched.add(trace_id)
            for trace_id in touched:
                self._traces[trace_id].changed.set()

    def new_trace_id(self) -> str:
        trace_id = uuid.uuid4().hex
        self._traces[trace_id] = _Trace()
        return trace_id

    async def wait_for(
        self, trace_id: str, num_tokens: int, start: int = 0, timeout: float = 5.0,
        output_ids: list[int] | None = None,
    ) -> list[list[float]] | None:
        """The weights of tokens ``start..num_tokens-1``, or None if they do not all arrive in time.

        ``output_ids``: the request's output tokens through ``num_tokens - 1``. With a
        draft the workers also send weights of positions after draft tokens that were
        then rejected; a record counts only if the draft tokens it assumes are the output's
        (the record of the step that accepted the token comes after, and overwrites it).
        """
        trace = self._traces.get(trace_id)
        if trace is None:
            return None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not all(trace.valid(i, output_ids) for i in range(start, num_tokens)):
            remaining = deadline - loop.time()
            if remaining <= 0:
                logger.warning("gate weights for trace %s did not arrive in %.1fs", trace_id, timeout)
                return None
            trace.changed.clear()
            try:
                await asyncio.wait_for(trace.changed.wait(), remaining)
            except asyncio.TimeoutError:
                pass
        return [trace.weights[i][0] for i in range(start, num_tokens)]

    def release(self, trace_id: str) -> None:
        self._traces.pop(trace_id, None)

    @property
    def open_traces(self) -> int:
        return len(self._traces)
