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

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from gatemix.defaults import DEFAULT_PROJECT_DIR
from gatemix.engine.engine_config import EngineSettings

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
        Path(DEFAULT_PROJECT_DIR),
        description="with neither --model-dir nor --project: the folder of the demo's project "
        "(`gatemix build-demo --out` writes it; `make serve` builds it first), served as its project",
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
    max_output_tokens: int = Field(
        65536,
        ge=1,
        description="most tokens one request may ask to generate: prompts x n x max_tokens "
        "(max_tokens as the engine will run it: the rest of the context when omitted)",
    )

    # Load and time limits (answered 413, 429 and 504 as OpenAI error bodies).
    max_body_bytes: int = Field(
        8 * 1024 * 1024,
        ge=1024,
        description="largest request body in bytes; a larger one is refused with 413 before "
        "it is read to the end or parsed",
    )
    max_queued_requests: int = Field(
        256,
        ge=0,
        description="most engine requests (choices) admitted beyond the engine's max_num_seqs "
        "slots (in every replica); a request that would queue past it is refused with 429 and Retry-After",
    )
    retry_after_s: int = Field(
        1, ge=0, description="the Retry-After header (seconds) of a 429 answer"
    )
    request_timeout_s: float | None = Field(
        600.0,
        gt=0,
        description="seconds a generation request may take, queueing included; past it its "
        "engine requests are aborted and it is answered 504 (a stream: an error event)",
    )

    # Process lifetime.
    shutdown_timeout_s: float = Field(
        20.0,
        ge=0,
        description="on SIGTERM or SIGINT: seconds in-flight requests may take to finish "
        "before they are cancelled and the process exits",
    )
    engine_check_interval_s: float = Field(
        0.5,
        gt=0,
        le=5,
        description="how often the server checks that the engine core is alive; a dead engine "
        "ends the process with exit status 4, for a supervisor to restart it",
    )

    # Chat templates and tools.
    chat_template: Path | None = Field(
        None,
        description="Jinja chat template file to use instead of the model folder's (or "
        "gatemix's fallback)",
    )
    tool_call_parser: str | None = Field(
        None,
        description="vLLM tool parser (e.g. hermes) that turns generated text into tool calls; "
        "`tools` are accepted only with one, and with a chat template that renders `tools`",
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

    # Swapping the gate while serving.
    admin_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="keys for the admin API (POST /admin/gate), apart from --api-key (env: a "
        "comma-separated list); without one the admin API is off",
    )
    gate_artifact: Path | None = Field(
        None,
        description="the router artifact SIGHUP re-reads and POST /admin/gate loads when given no "
        "path (default: the project's <work_dir>/gate; with --model-dir, the composite's own gate/)",
    )

    @field_validator("api_keys", "admin_keys", mode="before")
    @classmethod
    def _split_keys(cls, value):
        items = [value] if isinstance(value, str) else list(value or [])
        return [key.strip() for item in items for key in item.split(",") if key.strip()]

    @model_validator(mode="after")
    def _check_limits(self) -> Settings:
        if self.max_logprobs > 20:
            # vLLM's engine refuses more than its max_logprobs (20 by default).
            raise ValueError("max_logprobs above 20 is not supported by the engine")
        if self.chat_template is not None and not self.chat_template.is_file():
            raise ValueError(f"chat_template {self.chat_template} is not a file")
        if self.tool_call_parser is not None:
            # vLLM takes seconds to import: only a server with a tool parser pays for it.
            from vllm.tool_parsers import ToolParserManager

            try:
                ToolParserManager.get_tool_parser(self.tool_call_parser)
            except KeyError:
                raise ValueError(f"unknown tool_call_parser {self.tool_call_parser!r}") from None
        return self
