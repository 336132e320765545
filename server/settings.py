"""The server's one settings object: CLI flags and ``GATEMIX_*`` environment variables.

Every field's ``description`` is its ``--help`` text (``gatemix serve --help``
lists them all, with the matching environment variable). Flags given on the
command line win over the environment, which wins over the defaults. The
engine's settings are one nested object (``engine_config.EngineSettings``):
flat flags (``--max-model-len``), nested variables (``GATEMIX_ENGINE__MAX_MODEL_LEN``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from gatemix.engine.engine_config import EngineSettings
from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ENV_PREFIX = "GATEMIX_"
ENV_NESTED_DELIMITER = "__"  # GATEMIX_ENGINE__MAX_MODEL_LEN


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_NESTED_DELIMITER,
        extra="ignore",
        protected_namespaces=(),
    )

    # Where to listen.
    host: str = Field("127.0.0.1", description="address to bind")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to bind (0: any free port)")

    # What to serve.
    model_dir: Path | None = Field(
        None,
        description="model folder to serve: a gatemix composite, or a plain single-model HF "
        "folder (served as a one-expert mixture)",
    )
    project: Path | None = Field(
        None,
        description="gatemix project file (or a folder holding gatemix.toml): serves its "
        "composite, packed from its experts and fitted gate when missing or stale",
    )
    demo_dir: Path = Field(
        Path("artifacts/demo"),
        description="with neither --model-dir nor --project: the demo, built here if missing "
        "(its project file included), then served as its project (`make serve`)",
    )
    served_model_name: str | None = Field(
        None,
        description="model name of the gated mixture (default: the project's name, else the "
        "model folder's name)",
    )

    # The engine: vLLM's sizes and parallelism, one nested object (flags --max-model-len ...).
    engine: EngineSettings = Field(default_factory=EngineSettings, description="vLLM engine settings")

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
