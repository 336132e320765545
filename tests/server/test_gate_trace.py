"""``GateTraceReceiver`` on a real ZeroMQ socket, without an engine.

The engine's worker pushes ``(trace_id, token_index, weights)`` records; the
server waits until every token it has received has its weights. These pin the
cases that a live server rarely shows: records out of order or across
messages, records that never come, requests aborted mid-way, and messages that
are not records at all.
"""

from __future__ import annotations

import asyncio

import msgspec
import pytest
import zmq

from gatemix.engine.gate_trace import GateTraceReceiver, TraceSender


def run(coroutine):
    return asyncio.run(coroutine)


async def _receiver(tmp_path) -> GateTraceReceiver:
    receiver = GateTraceReceiver(f"ipc://{tmp_path}/trace.sock")
    await receiver.start()
    return receiver


def _weights(index: int) -> list[float]:
    return [index / 10, 1 - index / 10]


def test_out_of_order_records_are_returned_in_token_order(tmp_path):
    async def scenario():
        receiver = await _receiver(tmp_path)
        sender = TraceSender()
        try:
            trace = receiver.new_trace_id()
            waiter = asyncio.create_task(receiver.wait_for(trace, 4, timeout=5))
            # Three messages, no two in order; token 1 comes last, alone.
            sender.send(receiver.address, [(trace, 3, _weights(3), []), (trace, 0, _weights(0), [])])
            sender.send(receiver.address, [(trace, 2, _weights(2), [])])
            await asyncio.sleep(0.05)
            assert not waiter.done()  # token 1 is still missing
            sender.send(receiver.address, [(trace, 1, _weights(1), [])])
            assert await waiter == [_weights(i) for i in range(4)]
            # A later window of the same trace: only tokens start..num_tokens-1.
            sender.send(receiver.address, [(trace, 5, _weights(5), []), (trace, 4, _weights(4), [])])
            assert await receiver.wait_for(trace, 6, start=4, timeout=5) == [
                _weights(4), _weights(5)
            ]
        finally:
            await receiver.close()

    run(scenario())


def test_a_resampled_index_overwrites_and_other_traces_stay_apart(tmp_path):
    async def scenario():
        receiver = await _receiver(tmp_path)
        sender = TraceSender()
        try:
            first, second = receiver.new_trace_id(), receiver.new_trace_id()
            sender.send(
                receiver.address,
                [(first, 0, [0.9, 0.1], []), (second, 0, [0.2, 0.8], []), (first, 0, [0.5, 0.5], [])],
            )
            assert await receiver.wait_for(first, 1, timeout=5) == [[0.5, 0.5]]
            assert await receiver.wait_for(second, 1, timeout=5) == [[0.2, 0.8]]
        finally:
            await receiver.close()

    run(scenario())


def test_dropped_records_report_the_weights_missing_in_time(tmp_path):
    async def scenario():
        receiver = await _receiver(tmp_path)
        sender = TraceSender()
        try:
            trace = receiver.new_trace_id()
            sender.send(receiver.address, [(trace, 0, _weights(0), []), (trace, 2, _weights(2), [])])
            # Token 1 was dropped on the way: the wait ends at its timeout with None.
            loop = asyncio.get_running_loop()
            started = loop.time()
            assert await receiver.wait_for(trace, 3, timeout=0.3) is None
            assert 0.25 <= loop.time() - started < 2
            # What did arrive is kept: the tokens before the gap are still there.
            assert await receiver.wait_for(trace, 1, timeout=0.3) == [_weights(0)]
        finally:
            await receiver.close()

    run(scenario())


def test_a_sender_with_no_receiver_drops_and_counts_instead_of_blocking(tmp_path):
    """Nobody bound: ZeroMQ queues up to the high-water mark, then the sender drops, never waits."""
    import time

    sender = TraceSender()
    address = f"ipc://{tmp_path}/nobody.sock"
    started = time.monotonic()
    for i in range(12_000):  # past SNDHWM (10 000 messages)
        sender.send(address, [("t", i, _weights(1))])
    assert time.monotonic() - started < 5
    assert 0 < sender.dropped_records <= 2_000
    dropped = sender.dropped_records
    sender.send(address, [])  # nothing to send: nothing dropped
    assert sender.dropped_records == dropped


def test_an_aborted_request_releases_its_trace_and_late_records_are_dropped(tmp_path):
    async def scenario():
        receiver = await _receiver(tmp_path)
        sender = TraceSender()
        try:
            trace = receiver.new_trace_id()
            waiter = asyncio.create_task(receiver.wait_for(trace, 2, timeout=5))
            sender.send(receiver.address, [(trace, 0, _weights(0), [])])
            await asyncio.sleep(0.05)
            # The client went away: the request is aborted, its waiter cancelled, its trace released.
            waiter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiter
            receiver.release(trace)
            assert receiver.open_traces == 0
            # The worker still had records in flight for it: they must not resurrect the trace.
            sender.send(receiver.address, [(trace, 1, _weights(1), []), (trace, 2, _weights(2), [])])
            other = receiver.new_trace_id()
            sender.send(receiver.address, [(other, 0, _weights(7), [])])
            assert await receiver.wait_for(other, 1, timeout=5) == [_weights(7)]
            assert receiver.open_traces == 1
            assert await receiver.wait_for(trace, 1, timeout=0.1) is None
            receiver.release(other)
            receiver.release(other)  # releasing twice is harmless
            assert receiver.open_traces == 0
        finally:
            await receiver.close()

    run(scenario())


def test_a_malformed_message_does_not_stop_the_receiver(tmp_path):
    async def scenario():
        receiver = await _receiver(tmp_path)
        context = zmq.Context()
        push = context.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.connect(receiver.address)
        sender = TraceSender()
        try:
            trace = receiver.new_trace_id()
            push.send(b"\xc1 not msgpack")
            push.send(msgspec.msgpack.encode([["only", "two"]]))  # msgpack, but not records
            push.send(msgspec.msgpack.encode({"a": 1}))
            sender.send(receiver.address, [(trace, 0, _weights(0), [])])
            assert await receiver.wait_for(trace, 1, timeout=5) == [_weights(0)]
        finally:
            push.close()
            context.term()
            await receiver.close()

    run(scenario())


def test_a_record_assuming_rejected_draft_tokens_waits_for_the_accepted_one(tmp_path):
    """With a draft, index 1's first record assumed draft token 9 at index 0; the output has 5 there."""

    async def main():
        receiver = GateTraceReceiver(f"ipc://{tmp_path}/t.sock")
        await receiver.start()
        sender = TraceSender()
        try:
            trace = receiver.new_trace_id()
            sender.send(receiver.address, [(trace, 0, _weights(0), []), (trace, 1, _weights(8), [9])])
            assert await receiver.wait_for(trace, 2, timeout=0.3, output_ids=[5, 6]) is None
            sender.send(receiver.address, [(trace, 1, _weights(1), [5])])
            assert await receiver.wait_for(trace, 2, timeout=5, output_ids=[5, 6]) == [_weights(0), _weights(1)]
        finally:
            await receiver.close()

    asyncio.run(main())


class _Step:
    """A step whose records come out after ``wait`` (the device copy), or whose records raise."""

    copying = True

    def __init__(self, records: dict | None, waited: list) -> None:
        self._records, self._waited = records, waited

    def wait(self) -> None:
        self._waited.append(self)

    def records(self) -> dict:
        if self._records is None:
            raise RuntimeError("a step that cannot be read")
        assert self._waited[-1] is self, "records are read only after the step's copy is waited for"
        return self._records


def test_submitted_steps_are_sent_in_order_from_the_sender_thread_past_a_bad_one(tmp_path):
    """The worker hands each step over without waiting; a step that fails is dropped, the later ones still go."""
    async def scenario():
        receiver = await _receiver(tmp_path)
        sender = TraceSender()
        try:
            trace, waited = receiver.new_trace_id(), []
            sender.submit(_Step({receiver.address: [(trace, 0, [0.9, 0.1], [])]}, waited))
            sender.submit(_Step(None, waited))
            sender.submit(_Step({receiver.address: [(trace, 0, [0.3, 0.7], []), (trace, 1, _weights(1), [])]}, waited))
            assert await receiver.wait_for(trace, 2, timeout=5) == [[0.3, 0.7], _weights(1)]
            await asyncio.sleep(0.1)  # the first step, had it come last, would overwrite index 0 by now
            assert await receiver.wait_for(trace, 2, timeout=5) == [[0.3, 0.7], _weights(1)]
            assert len(waited) == 3
        finally:
            await receiver.close()

    run(scenario())


def test_records_already_on_the_host_are_sent_by_the_caller(tmp_path):
    """On a CPU the weights are on the host when the step is submitted: no thread, no wait."""
    async def scenario():
        receiver = await _receiver(tmp_path)
        sender = TraceSender()
        try:
            trace, waited = receiver.new_trace_id(), []
            step = _Step({receiver.address: [(trace, 0, _weights(0), [])]}, waited)
            step.copying = False
            sender.submit(step)
            assert waited == [step]  # waited for (a no-op there) in the caller, before submit returned
            assert await receiver.wait_for(trace, 1, timeout=5) == [_weights(0)]
        finally:
            await receiver.close()

    run(scenario())
