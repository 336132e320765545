"""The engine's one settings object, and the one place that turns it into vLLM engine arguments.

``EngineSettings`` is nested in the server's ``Settings`` (``gatemix serve``
flags and ``GATEMIX_ENGINE__*`` variables) and built directly by the
benchmarks and the tests, so its defaults live here alone.

Defaults follow the device. On a GPU: vLLM's compilation and CUDA graphs on,
the experts' own dtype (fp32 checkpoints run in bf16, vLLM's ``auto``), the
context length the experts' configs allow. On the CPU backend: eager (compiling
costs minutes of start-up on a small machine for little gain at these sizes),
the KV cache sized in GiB (``VLLM_CPU_KVCACHE_SPACE``), and ``auto`` meaning the
checkpoint's own dtype where the CPU has no native bf16 (no AVX512-BF16, no
AMX): vLLM's CPU backend would run an fp32 checkpoint in bf16 there, emulated
and about 3x slower. ``dtype="float32"``
stays available everywhere for exactness checks.

The settings that make the composite correct (``COMPOSITE_ENGINE_ARGS``,
``COMPOSITE_CUDAGRAPH_MODE``) are set here once. A plain model folder (one expert, a student) keeps vLLM's own choice, as
``vllm serve`` would.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from gatemix.engine.composite_folder import (
    COMPILE_MIXING_KEY,
    LORA_PARALLEL_REFUSAL,
    is_composite_folder,
    is_lora_composite_folder,
)
from gatemix.engine.gate_reload import WORKER_EXTENSION
from gatemix.engine.spec_decode import check_draft, speculative_config
from gatemix.errors import UserError

logger = logging.getLogger(__name__)

# The worker extension lets the server swap the gate while serving (engine/gate_reload.py).
# Async scheduling stays vLLM's choice: the gate trace indexes a token by its position, not by
# the worker's output list (which holds placeholders for steps in flight), and the posterior
# state reads the tokens of each forward pass itself (tests/engine/test_async_scheduling.py).
COMPOSITE_ENGINE_ARGS = {"worker_extension_cls": WORKER_EXTENSION}
# CUDA graphs for the experts' compiled graph only (the ensemble, captured piecewise between
# attention ops). The router head and the per-request pins run eagerly every step: they read
# which request sits in which batch row, host-side state that a full-model graph would freeze
# at capture time.
COMPOSITE_CUDAGRAPH_MODE = "PIECEWISE"
# The README's switch for compiled mixing, read once here when an engine is built;
# ``EngineSettings.compile_mixing`` is the same switch as configuration.
COMPILE_MIXING_ENV = "GATEMIX_COMPILE_MIXING"


def on_cpu() -> bool:
    from vllm.platforms import current_platform  # vllm: deferred, the settings import without it

    return current_platform.is_cpu()


class EngineSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="weights/activations dtype; auto: vLLM's choice (fp32 checkpoints run in "
        "bf16), except on a CPU without native bf16, where the checkpoint's own; float32 for exact checks",
    )
    max_model_len: int | None = Field(
        None, ge=16, description="context length in tokens; default: what the experts' configs allow"
    )
    max_num_seqs: int = Field(64, ge=1, description="most sequences decoded in one engine step")
    max_num_batched_tokens: int | None = Field(None, ge=1, description="token budget per engine step")
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="fraction of GPU memory for vLLM (CPU: see kv_cache_gib)"
    )
    kv_cache_gib: int = Field(2, ge=1, description="CPU only: KV cache size in whole GiB")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per engine (tensor parallelism)")
    pipeline_parallel_size: int = Field(
        1, ge=1, description="pipeline stages (each holds a slice of every expert's layers)"
    )
    data_parallel_size: int = Field(
        1, ge=1, description="engine replicas behind one server, each request on one of them (vLLM's "
        "data parallelism; a gate reload reaches every replica)"
    )
    distributed_executor_backend: Literal["mp", "ray"] | None = Field(
        None, description="vLLM executor: mp (one node) or ray (across nodes); default: vLLM's choice"
    )
    enforce_eager: bool | None = Field(
        None,
        description="skip torch.compile and CUDA graphs; default: eager on CPU, compiled with "
        "CUDA graphs on GPU",
    )
    enable_prefix_caching: bool = Field(
        True,
        description="reuse the KV cache of shared prompt prefixes (every gate, the posterior's "
        "state included: engine/slot_logprobs.py)",
    )
    draft: str | None = Field(
        None,
        description="a small causal LM with the experts' tokenizer (the distilled student, say) that "
        "proposes tokens the composite verifies in one pass: vLLM's speculative decoding, outputs unchanged",
    )
    num_draft_tokens: int = Field(3, ge=1, le=16, description="tokens the draft proposes per step (with --draft)")
    async_scheduling: bool | None = Field(
        None,
        description="schedule the next engine step while the device runs this one (vLLM's async "
        "scheduling); default: vLLM's choice, on for GPUs (vLLM's CPU backend turns it off)",
    )
    seed: int = Field(0, description="engine seed (requests without a seed draw from it)")
    compile_mixing: bool = Field(
        False,
        description=f"compile the composite's mixing step (torch.compile of the fused form; "
        f"{COMPILE_MIXING_ENV}=1 also turns it on)",
    )

    def running_capacity(self) -> int:
        """Sequences the engine decodes at once: ``max_num_seqs`` in each replica."""
        return self.max_num_seqs * self.data_parallel_size

    def resolved_enforce_eager(self) -> bool:
        return on_cpu() if self.enforce_eager is None else self.enforce_eager

    def resolved_compile_mixing(self) -> bool:
        return self.compile_mixing or os.environ.get(COMPILE_MIXING_ENV, "0") == "1"


def cpu_has_native_bf16() -> bool:
    import torch  # torch: deferred, as above

    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def checkpoint_dtype(model_dir: str | Path) -> str | None:
    """The dtype the folder's config.json names (``dtype``, or the older ``torch_dtype``)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    named = config.get("dtype") or config.get("torch_dtype")
    return named if named in ("float32", "bfloat16", "float16") else None


def resolved_dtype(model_dir: str | Path, dtype: str) -> str:
    """``auto`` made concrete where vLLM's choice would be slow: see the module docstring."""
    if dtype != "auto" or not on_cpu() or cpu_has_native_bf16():
        return dtype
    own = checkpoint_dtype(model_dir)
    if own is None or own == "bfloat16":
        return dtype
    logger.info(
        "dtype auto -> %s: this CPU has no native bf16 (no avx512_bf16, no AMX), where vLLM's "
        "bf16 would be emulated and about 3x slower; the checkpoint's own dtype is kept", own,
    )
    return own


def check_engine_settings(model_dir: str | Path, settings: EngineSettings) -> None:
    """Refuse, in one line, what a composite cannot run with yet."""
    if settings.draft is not None:
        check_draft(model_dir, settings.draft)
    parallel = settings.tensor_parallel_size * settings.pipeline_parallel_size
    if parallel > 1 and is_lora_composite_folder(model_dir):
        raise UserError(LORA_PARALLEL_REFUSAL)


def engine_kwargs(model_dir: str | Path, settings: EngineSettings) -> dict:
    """Keyword arguments for ``vllm.LLM`` / ``AsyncEngineArgs``."""
    check_engine_settings(model_dir, settings)
    if on_cpu():
        # The CPU backend sizes its KV cache from this variable, read at engine start.
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(int(settings.kv_cache_gib))
        if settings.async_scheduling:
            logger.warning("--async-scheduling: vLLM's CPU backend turns async scheduling off")
    kwargs = {
        "model": str(model_dir),
        "dtype": resolved_dtype(model_dir, settings.dtype),
        "max_num_seqs": settings.max_num_seqs,
        "gpu_memory_utilization": settings.gpu_memory_utilization,
        "tensor_parallel_size": settings.tensor_parallel_size,
        "pipeline_parallel_size": settings.pipeline_parallel_size,
        "data_parallel_size": settings.data_parallel_size,
        "enforce_eager": settings.resolved_enforce_eager(),
        "seed": settings.seed,
        "enable_prefix_caching": settings.enable_prefix_caching,
    }
    optional = {
        "max_model_len": settings.max_model_len,
        "max_num_batched_tokens": settings.max_num_batched_tokens,
        "distributed_executor_backend": settings.distributed_executor_backend,
        "async_scheduling": settings.async_scheduling,
    }
    kwargs.update({name: value for name, value in optional.items() if value is not None})
    if settings.draft is not None:
        kwargs["speculative_config"] = speculative_config(settings.draft, settings.num_draft_tokens)
        # Each output then carries its own acceptance, which /metrics counts per dominant expert.
        kwargs["per_request_spec_decode_metrics"] = "summary"
    if is_composite_folder(model_dir):
        kwargs.update(COMPOSITE_ENGINE_ARGS)
        if not on_cpu() and not kwargs["enforce_eager"]:
            kwargs["compilation_config"] = {"cudagraph_mode": COMPOSITE_CUDAGRAPH_MODE}
        if settings.resolved_compile_mixing():
            kwargs["additional_config"] = {COMPILE_MIXING_KEY: True}
    return kwargs


def build_async_engine(model_dir: str | Path, settings: EngineSettings, served_model_name: str | None = None):
    """A vLLM ``AsyncLLM`` over the model folder (composite or a single expert).

    ``served_model_name`` becomes the ``model_name`` label of vLLM's ``vllm:`` metrics, which the
    dashboards built for vLLM filter on (else the label is the folder's path).
    """
    # vllm: deferred, the settings import without it (offline jobs, --help)
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    kwargs = engine_kwargs(model_dir, settings)
    if served_model_name is not None:
        kwargs["served_model_name"] = served_model_name
    return AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))


def build_offline_engine(model_dir: str | Path, settings: EngineSettings | None = None, **overrides):
    """A vLLM ``LLM`` (offline batch API) over the model folder; ``overrides`` are settings fields."""
    from vllm import LLM  # vllm: deferred, as above

    settings = EngineSettings.model_validate({**(settings or EngineSettings()).model_dump(), **overrides})
    return LLM(**engine_kwargs(model_dir, settings))


def shutdown_offline_engine(llm, timeout_s: float = 30.0) -> None:
    """Stops an offline engine's processes, even when vLLM's own force-kill trips.

    vLLM sends SIGTERM, waits ``timeout_s``, then force-kills what is left through
    ``kill_process_tree``, which names each child with psutil before killing it: a
    child that exits in between raises ``NoSuchProcess`` and leaves the rest undone
    (seen with two tensor-parallel workers on a busy 2-core machine). The longer
    wait makes that path rare; when it still runs, the processes left are killed
    here and the client's sockets released, which is what the shutdown was for.
    """
    import psutil

    engine_core = llm.llm_engine.engine_core
    try:
        engine_core.shutdown(timeout=timeout_s)
    except psutil.NoSuchProcess:
        for process in engine_core.resources.engine_manager.processes:
            if process.is_alive():
                process.kill()
        engine_core.resources()


@contextlib.contextmanager
def stopping(llm):
    """``with stopping(LLM(...)) as llm``: the offline engine, stopped when the block ends.

    Like ``contextlib.closing``: ``shutdown_offline_engine`` on the way out, then a
    collection, so the engine's cyclic objects go with it and not at some later gc.
    """
    try:
        yield llm
    finally:
        shutdown_offline_engine(llm)
        gc.collect()
