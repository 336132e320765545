"""The server's one settings object: CLI flags and ``GATEMIX_*`` environment variables.

Every field's ``description`` is its ``--help`` text (``gatemix serve --help``
lists them all, with the matching environment variable). Flags given on the
command line win over the environment, which wins over the defaults.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from gatemix.engine.engine_config import EngineSettings
from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ENV_PREFIX = "GATEMIX_"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="ignore", protected_namespaces=()
    )

    # Where to listen.
    host: str = Field("127.0.0.1", description="address to bind")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to bind (0: any free port)")

    # What to serve.
    model_dir: Path | None = Field(
        None,
        description="model folder to serve: a gatemix composite, or a plain single-model HF "
        "folder (served as a one-expert mixture). Default: <demo-dir>/composite, built if missing",
    )
    demo_dir: Path = Field(
        Path("artifacts/demo"),
        description="demo build folder used when --model-dir is not given (`make serve`)",
    )
    served_model_name: str | None = Field(
        None,
        description="model name of the gated mixture (default: the model folder's name; "
        "gatemix-demo for the demo)",
    )

    # Engine sizes (mapped onto gatemix.engine.engine_config.EngineSettings).
    dtype: str = Field(
        "auto", description="weights/activations dtype: auto, float32, bfloat16, float16"
    )
    max_model_len: int = Field(
        512, ge=16, description="context length in tokens (prompt + completion)"
    )
    max_num_seqs: int = Field(64, ge=1, description="most sequences decoded in one engine step")
    max_num_batched_tokens: int | None = Field(
        None, ge=1, description="token budget per engine step"
    )
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="fraction of GPU memory for vLLM (CPU: see --kv-cache-gib)"
    )
    kv_cache_gib: int = Field(2, ge=1, description="CPU only: KV cache size in whole GiB")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per engine (tensor parallelism)")
    pipeline_parallel_size: int = Field(
        1, ge=1, description="pipeline stages (each holds a slice of every expert's layers)"
    )
    distributed_executor_backend: str | None = Field(
        None, description="vLLM executor: mp (one node) or ray (across nodes); default: vLLM's choice"
    )
    enforce_eager: bool = Field(True, description="skip torch.compile / CUDA graphs")
    seed: int = Field(0, description="engine seed (requests without a seed draw from it)")

    # Access.
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="accepted API keys (env: a comma-separated list). With any key set, "
        "/v1/* require `Authorization: Bearer <key>`; /health and /metrics stay open",
    )

    # Per-request limits.
    max_n: int = Field(
        16, ge=1, description="largest `n` (choices per prompt) a request may ask for"
    )
    max_stop: int = Field(4, ge=0, description="most stop strings per request")
    max_tokens_limit: int | None = Field(
        None,
        ge=1,
        description="largest max_tokens a request may ask for (default: the context length)",
    )
    max_logprobs: int = Field(
        20, ge=0, description="most top logprobs per token a request may ask for"
    )
    max_prompts: int = Field(64, ge=1, description="most prompts in one completions request")
    gate_trace_timeout_s: float = Field(
        5.0,
        gt=0,
        description="seconds to wait for a token's gate weights before reporting them missing",
    )
    log_level: str = Field("info", description="uvicorn log level")
    timeout_keep_alive: int = Field(
        65,
        ge=1,
        description=(
            "seconds an idle keep-alive connection stays open; longer than clients' pools "
            "(aiohttp's 60 s, which `vllm bench serve` uses) so a reused connection is never "
            "closed under a client mid-request"
        ),
    )

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value):
        items = [value] if isinstance(value, str) else list(value or [])
        return [key.strip() for item in items for key in item.split(",") if key.strip()]

    @model_validator(mode="after")
    def _check_limits(self) -> Settings:
        if self.max_logprobs > 20:
            # vLLM's engine refuses more than its max_logprobs (20 by default).
            raise ValueError("max_logprobs above 20 is not supported by the engine")
        return self

    def engine_settings(self, model_dir: str | Path) -> EngineSettings:
        return EngineSettings(
            model_dir=str(model_dir),
            dtype=self.dtype,
            max_model_len=self.max_model_len,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            gpu_memory_utilization=self.gpu_memory_utilization,
            kv_cache_gib=self.kv_cache_gib,
            tensor_parallel_size=self.tensor_parallel_size,
            pipeline_parallel_size=self.pipeline_parallel_size,
            distributed_executor_backend=self.distributed_executor_backend,
            enforce_eager=self.enforce_eager,
            seed=self.seed,
        )
