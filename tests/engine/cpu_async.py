"""Test-only: vLLM's async scheduling on the CPU backend, to test the composite under it.

vLLM's CPU platform turns async scheduling off ("not required on CPU"), yet the
scheduler, the engine core's batch queue and the model runner's async path are
the same code as on a GPU; only the CUDA streams and events that overlap the
device-to-host copy are missing. On a CPU every op is synchronous, so those are
no-ops here: ``cpu_async_worker.AsyncCpuWorkerExtension`` (named as the engine's worker
extension) stubs them in each worker process at import, and ``async_scheduling_on_cpu``
keeps a requested ``async_scheduling=True`` through the platform's check.
What runs is vLLM's real async scheduling: steps scheduled before the last
one's tokens are known, placeholders in the worker's output lists, optimistic
draft acceptance corrected a step later.
"""

from __future__ import annotations

import contextlib

# Imported by the engine's workers only: it replaces torch's CUDA stream calls in the process.
ASYNC_CPU_WORKER_EXTENSION = "tests.engine.cpu_async_worker.AsyncCpuWorkerExtension"


@contextlib.contextmanager
def async_scheduling_on_cpu():
    """While building an engine: a requested ``async_scheduling=True`` survives the CPU platform's check."""
    from vllm.platforms import cpu  # vllm: deferred, as in the engine modules

    original = cpu.CpuPlatform.check_and_update_config

    def keep_async(cls, vllm_config) -> None:
        wanted = vllm_config.scheduler_config.async_scheduling
        original(vllm_config)
        if wanted:
            vllm_config.scheduler_config.async_scheduling = True

    cpu.CpuPlatform.check_and_update_config = classmethod(keep_async)
    try:
        yield
    finally:
        cpu.CpuPlatform.check_and_update_config = original



def async_llm(engine_args: dict):
    """A ``vllm.LLM`` of ``engine_args`` (``engine_kwargs`` and more) under vLLM's async scheduling, checked in its worker."""
    from vllm import LLM  # vllm: deferred, as above

    with async_scheduling_on_cpu():
        llm = LLM(**{**engine_args, "async_scheduling": True, "worker_extension_cls": ASYNC_CPU_WORKER_EXTENSION})
    assert llm.collective_rpc("runs_async_scheduling") == [True], "the worker did not take vLLM's async path"
    return llm
