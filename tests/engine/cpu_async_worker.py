"""Imported in a vLLM worker process only (``cpu_async.ASYNC_CPU_WORKER_EXTENSION``): CUDA streams as no-ops.

The CPU model runner's async path records events and copies on side streams;
on a CPU every op is already done when it returns, so they do nothing here.
"""

from __future__ import annotations

import contextlib

import torch

from gatemix.engine.gate_reload import GateReloadExtension


class _Event:
    def __init__(self, *args, **kwargs) -> None:
        pass

    def record(self, *args, **kwargs) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def wait(self, *args, **kwargs) -> None:
        pass

    def query(self) -> bool:
        return True


class _Stream:
    device = torch.device("cpu")

    def __init__(self, *args, **kwargs) -> None:
        pass

    def wait_stream(self, *args, **kwargs) -> None:
        pass

    def wait_event(self, *args, **kwargs) -> None:
        pass

    def synchronize(self) -> None:
        pass


def _stub_cuda_streams() -> None:
    torch.cuda.Event = torch.Event = _Event
    torch.cuda.Stream = _Stream
    torch.cuda.current_stream = lambda *args, **kwargs: _Stream()
    torch.cuda.stream = lambda *args, **kwargs: contextlib.nullcontext()


class AsyncCpuWorkerExtension(GateReloadExtension):
    """The composite's worker extension, imported in a worker only when a test names it."""

    def runs_async_scheduling(self) -> bool:
        """Whether this worker's model runner took vLLM's async path."""
        return self.model_runner.use_async_scheduling


if not torch.cuda.is_available():
    _stub_cuda_streams()
