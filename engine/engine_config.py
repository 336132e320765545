"""One place that turns gatemix's engine settings into vLLM engine arguments.

The server, the benchmarks and the tests all build their engines here, so the
settings that make the composite correct (no async scheduling, whose in-flight
placeholder tokens would shift the per-token gate trace) are set once. A plain
model folder (one expert, a student) keeps vLLM's own choice, as ``vllm serve``
would: on GPU that is async scheduling; the CPU backend turns it off anyway.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field


def on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


@dataclass
class EngineSettings:
    model_dir: str
    dtype: str = field(default="auto", metadata={"help": "weights/activations dtype: auto, float32, bfloat16, float16"})
    max_model_len: int = field(default=512, metadata={"help": "context length in tokens"})
    max_num_seqs: int = field(default=64, metadata={"help": "most sequences decoded in one step"})
    max_num_batched_tokens: int | None = field(default=None, metadata={"help": "token budget per step"})
    gpu_memory_utilization: float = field(default=0.1, metadata={"help": "fraction of device memory for vLLM (CPU: see kv_cache_gib)"})
    kv_cache_gib: int = field(default=1, metadata={"help": "CPU only: KV cache size in whole GiB (VLLM_CPU_KVCACHE_SPACE)"})
    tensor_parallel_size: int = field(default=1, metadata={"help": "GPUs per engine (vLLM tensor parallelism)"})
    pipeline_parallel_size: int = field(default=1, metadata={"help": "pipeline stages (vLLM pipeline parallelism)"})
    distributed_executor_backend: str | None = field(default=None, metadata={"help": "mp or ray; None: vLLM's choice"})
    enforce_eager: bool = field(default=True, metadata={"help": "skip torch.compile / CUDA graphs"})
    seed: int = field(default=0, metadata={"help": "engine seed"})

    def __post_init__(self) -> None:
        if self.max_model_len < 16 or self.max_num_seqs < 1 or min(self.tensor_parallel_size, self.pipeline_parallel_size) < 1:
            raise ValueError("max_model_len >= 16, max_num_seqs >= 1 and parallel sizes >= 1 required")
        if self.distributed_executor_backend not in (None, "mp", "ray"):
            raise ValueError("distributed_executor_backend must be mp or ray")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")
        if self.kv_cache_gib < 1:
            raise ValueError("kv_cache_gib must be a whole number of GiB, at least 1")


def engine_kwargs(settings: EngineSettings) -> dict:
    """Keyword arguments for ``vllm.LLM`` / ``AsyncEngineArgs``."""
    from gatemix.engine.composite_folder import is_composite_folder

    if on_cpu():
        # The CPU backend sizes its KV cache from this variable, read at engine start.
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(int(settings.kv_cache_gib))
    kwargs = dict(
        model=settings.model_dir,
        dtype=settings.dtype,
        max_model_len=settings.max_model_len,
        max_num_seqs=settings.max_num_seqs,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        tensor_parallel_size=settings.tensor_parallel_size,
        pipeline_parallel_size=settings.pipeline_parallel_size,
        enforce_eager=settings.enforce_eager,
        seed=settings.seed,
    )
    if is_composite_folder(settings.model_dir):
        kwargs["async_scheduling"] = False
    if settings.distributed_executor_backend:
        kwargs["distributed_executor_backend"] = settings.distributed_executor_backend
    if settings.max_num_batched_tokens:
        kwargs["max_num_batched_tokens"] = settings.max_num_batched_tokens
    return kwargs


def build_async_engine(settings: EngineSettings):
    """A vLLM ``AsyncLLM`` over the model folder (composite or a single expert)."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    return AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_kwargs(settings)))


def build_offline_engine(settings: EngineSettings):
    """A vLLM ``LLM`` (offline batch API) over the model folder."""
    from vllm import LLM

    return LLM(**engine_kwargs(settings))
