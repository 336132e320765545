"""The lockstep ensemble baseline: how the tools we know mix experts today.

Each expert runs in its own ``vllm serve`` process. For every generated token
this server asks every expert, concurrently, for one token with its top-20
log-probs (``max_tokens=1, logprobs=20``), mixes the K truncated distributions
outside the engine with the gate weights, picks the next token and repeats:
``max_tokens`` round trips per request, each costing K HTTP calls and K
scheduler passes (vLLM's prefix cache spares the re-prefill of the context).

The tail bucket. An expert reports only its top-20, so the mass it puts on the
rest of the vocabulary is known only in total, ``1 - sum(top-20 probs)``. We
spread it evenly over the ``V - 20`` tokens outside that expert's top-20 (the
"tail bucket" of TRL's server distillation). Each expert's completed
distribution then sums to 1, and so does the mixture. With one expert the
greedy token is exact: a tail token's share never exceeds the expert's own
20th probability, so the argmax stays the expert's. Sampling (temperature > 0)
draws tail tokens from the spread mass, an approximation only this baseline makes.

    python -m gatemix.bench.lockstep_server --expert http://127.0.0.1:8001 \
        --expert http://127.0.0.1:8002 --tokenizer EXPERT_DIR --port 8000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from gatemix.gate.mixing import log_weights_from_probs, mix_logprobs

logger = logging.getLogger(__name__)

TOP_LOGPROBS = 20  # vLLM's default --max-logprobs, and what a peer would ask for


# ---------------------------------------------------------------- mixing math
def complete_top_logprobs(top_logprobs: dict[int, float], vocab_size: int) -> torch.Tensor:
    """One expert's truncated distribution completed with the tail bucket. -> (V,) log-probs.

    ``top_logprobs`` maps token id -> log-prob for the expert's top-k tokens. The
    leftover mass ``1 - sum(exp(top))`` is spread evenly over the other ``V - k``
    tokens; a leftover at or below zero (rounding) leaves them at -inf.
    """
    dense = torch.full((vocab_size,), float("-inf"), dtype=torch.float64)
    ids = torch.tensor(list(top_logprobs), dtype=torch.long)
    values = torch.tensor(list(top_logprobs.values()), dtype=torch.float64)
    dense[ids] = values
    tail_size = vocab_size - len(top_logprobs)
    leftover = 1.0 - values.exp().sum().item()
    if tail_size > 0 and leftover > 0:
        tail_logprob = math.log(leftover / tail_size)
        in_top = torch.zeros(vocab_size, dtype=torch.bool)
        in_top[ids] = True
        dense[~in_top] = tail_logprob
    return dense


def mix_top_logprobs(
    expert_top_logprobs: list[dict[int, float]], log_weights: torch.Tensor, vocab_size: int
) -> torch.Tensor:
    """Mixture of K top-k distributions, each completed with its tail bucket.

    Shapes: K dicts of token id -> log-prob, ``(K,)`` normalized log weights -> ``(V,)``.
    """
    expert_logprobs = torch.stack([complete_top_logprobs(top, vocab_size) for top in expert_top_logprobs])
    return mix_logprobs(expert_logprobs, log_weights.to(torch.float64))  # (K, V), (K,) -> (V,)


def choose_token(mixture_logprobs: torch.Tensor, temperature: float, generator: torch.Generator | None) -> int:
    """Greedy at temperature 0, else a draw from the tempered mixture. ``(V,) -> token id``."""
    if temperature <= 0:
        return int(mixture_logprobs.argmax())
    probs = torch.softmax(mixture_logprobs / temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


# ------------------------------------------------------------------- protocol
class StreamOptions(BaseModel):
    include_usage: bool = False


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # the load generator sends fields we ignore

    model: str | None = None
    prompt: str | list[int] | list[str]
    max_tokens: int = Field(default=16, ge=1, le=65536)
    temperature: float = Field(default=1.0, ge=0.0)
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # vLLM extensions
    ignore_eos: bool = False
    return_token_ids: bool = False


@dataclass
class LockstepSettings:
    expert_urls: list[str] = field(metadata={"help": "base URL of each expert's vLLM server"})
    tokenizer_dir: str = field(metadata={"help": "an expert folder: tokenizer and config.json (vocab size)"})
    weights: list[float] | None = field(default=None, metadata={"help": "gate weights, uniform if None"})
    served_model_name: str = field(default="lockstep-ensemble", metadata={"help": "name in /v1/models"})
    request_timeout_s: float = field(default=600.0, metadata={"help": "per expert call"})
    expert_models: list[str] | None = field(
        default=None, metadata={"help": "each expert's model name on its server (None: the first it lists)"})

    def __post_init__(self) -> None:
        if not self.expert_urls:
            raise ValueError("at least one expert URL is required")
        if self.expert_models is not None and len(self.expert_models) != len(self.expert_urls):
            raise ValueError(f"{len(self.expert_models)} expert models for {len(self.expert_urls)} experts")
        if self.weights is not None and len(self.weights) != len(self.expert_urls):
            raise ValueError(f"{len(self.weights)} weights for {len(self.expert_urls)} experts")


class ExpertCallError(Exception):
    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code


# ------------------------------------------------------------------- ensemble
class LockstepEnsemble:
    """The per-token loop over K expert servers."""

    def __init__(self, *, settings: LockstepSettings, client, tokenizer, vocab_size: int) -> None:
        self.settings = settings
        self.client = client
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        weights = torch.tensor(settings.weights or [1.0] * len(settings.expert_urls), dtype=torch.float64)
        self.log_weights = log_weights_from_probs(weights)
        self.expert_models: list[str] = []

    async def discover_models(self) -> None:
        """Each expert server's model name: as given, else the first its /v1/models lists."""
        if self.settings.expert_models is not None:
            self.expert_models = list(self.settings.expert_models)
            return
        self.expert_models = []
        for url in self.settings.expert_urls:
            response = await self.client.get(f"{url}/v1/models")
            response.raise_for_status()
            self.expert_models.append(response.json()["data"][0]["id"])

    async def _expert_top_logprobs(self, k: int, token_ids: list[int]) -> dict[int, float]:
        payload = {
            "model": self.expert_models[k], "prompt": token_ids, "max_tokens": 1, "temperature": 0.0,
            "logprobs": TOP_LOGPROBS, "return_tokens_as_token_ids": True, "ignore_eos": True,
        }
        url = f"{self.settings.expert_urls[k]}/v1/completions"
        try:
            response = await self.client.post(url, json=payload)
        except httpx.TransportError:
            # A pooled keep-alive connection the expert server closed as we reused it; the
            # call is idempotent (greedy, one token), so one retry on a fresh connection is safe.
            try:
                response = await self.client.post(url, json=payload)
            except httpx.TransportError as exc:
                raise ExpertCallError(502, f"expert {k}: {exc!r}") from exc
        if response.status_code != 200:
            raise ExpertCallError(response.status_code, f"expert {k}: {response.text[:500]}")
        top = response.json()["choices"][0]["logprobs"]["top_logprobs"][0]
        # Keys are "token_id:123" thanks to return_tokens_as_token_ids.
        return {int(key.rsplit(":", 1)[1]): value for key, value in top.items()}

    async def next_token(self, token_ids: list[int], temperature: float, generator) -> int:
        tops = await asyncio.gather(*(self._expert_top_logprobs(k, token_ids) for k in range(len(self.expert_models))))
        mixture = mix_top_logprobs(list(tops), self.log_weights, self.vocab_size)
        return choose_token(mixture, temperature, generator)

    def encode(self, prompt: str | list[int] | list[str]) -> list[int]:
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise ValueError("the lockstep baseline takes one prompt per request")
            prompt = prompt[0]
        if isinstance(prompt, str):
            return self.tokenizer(prompt).input_ids  # as vLLM does: special tokens added
        return list(prompt)

    async def generate(self, request: CompletionRequest, prompt_ids: list[int]) -> AsyncIterator[tuple[int, str]]:
        """Yields (token id, new text) per generated token."""
        generator = None
        if request.temperature > 0 and request.seed is not None:
            generator = torch.Generator().manual_seed(request.seed)
        eos_id = self.tokenizer.eos_token_id
        token_ids, generated, emitted = list(prompt_ids), [], ""
        for _ in range(request.max_tokens):
            token = await self.next_token(token_ids, request.temperature, generator)
            token_ids.append(token)
            generated.append(token)
            text = self.tokenizer.decode(generated, skip_special_tokens=True)
            # Hold back a half-decoded UTF-8 character until its next byte arrives.
            delta = text[len(emitted):] if not text.endswith("\ufffd") else ""
            emitted += delta
            yield token, delta
            if token == eos_id and not request.ignore_eos:
                return


# ------------------------------------------------------------------------ app
def _error(status_code: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": None, "code": status_code}}
    return JSONResponse(body, status_code=status_code)


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def create_app(settings: LockstepSettings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        from transformers import AutoTokenizer  # heavy: the tests import this module's pure math

        vocab_size = json.loads((Path(settings.tokenizer_dir) / "config.json").read_text())["vocab_size"]
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=1024)
        async with httpx.AsyncClient(timeout=settings.request_timeout_s, limits=limits) as client:
            ensemble = LockstepEnsemble(
                settings=settings, client=client, tokenizer=AutoTokenizer.from_pretrained(settings.tokenizer_dir),
                vocab_size=vocab_size,
            )
            await ensemble.discover_models()
            app.state.ensemble = ensemble
            yield

    app = FastAPI(title="gatemix lockstep ensemble baseline", lifespan=lifespan)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(400, str(exc.errors()[:3]))

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": settings.served_model_name, "object": "model", "owned_by": "gatemix"}]}

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict:
        body = await request.json()
        tokens = app.state.ensemble.tokenizer(body["prompt"], add_special_tokens=body.get("add_special_tokens", True)).input_ids
        return {"tokens": tokens, "count": len(tokens)}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict:
        return {"prompt": app.state.ensemble.tokenizer.decode((await request.json())["tokens"])}

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest):
        return await _complete(app.state.ensemble, request, settings.served_model_name)

    return app


async def _complete(ensemble: LockstepEnsemble, request: CompletionRequest, model_name: str):
    """One completion request: a JSON body, a stream of events, or an OpenAI error body."""
    try:
        prompt_ids = ensemble.encode(request.prompt)
    except ValueError as exc:
        return _error(400, str(exc))
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": model_name}
    if request.stream:
        return StreamingResponse(_stream(ensemble, request, prompt_ids, head), media_type="text/event-stream")
    tokens, text = [], ""
    try:
        async for token, delta in ensemble.generate(request, prompt_ids):
            tokens.append(token)
            text += delta
    except ExpertCallError as exc:
        return _error(exc.status_code if exc.status_code < 500 else 502, str(exc))
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": _finish_reason(request, tokens)}
    if request.return_token_ids:
        choice["token_ids"] = tokens
    return {**head, "choices": [choice], "usage": _usage(len(prompt_ids), len(tokens))}


def _finish_reason(request: CompletionRequest, tokens: list[int]) -> str:
    return "length" if len(tokens) >= request.max_tokens else "stop"


async def _stream(ensemble: LockstepEnsemble, request: CompletionRequest, prompt_ids: list[int], head: dict):
    def event(payload: dict) -> str:
        return f"data: {json.dumps(payload)}\n\n"

    tokens: list[int] = []
    try:
        async for token, delta in ensemble.generate(request, prompt_ids):
            tokens.append(token)
            choice = {"index": 0, "text": delta, "logprobs": None, "finish_reason": None}
            if len(tokens) >= request.max_tokens or (token == ensemble.tokenizer.eos_token_id and not request.ignore_eos):
                choice["finish_reason"] = _finish_reason(request, tokens)
            yield event({**head, "choices": [choice]})
    except ExpertCallError as exc:
        yield event({"error": {"message": str(exc), "type": "expert_error", "code": exc.status_code}})
    if request.stream_options and request.stream_options.include_usage:
        yield event({**head, "choices": [], "usage": _usage(len(prompt_ids), len(tokens))})
    yield "data: [DONE]\n\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--expert", action="append", required=True, help="an expert's vLLM base URL (repeat)")
    parser.add_argument("--expert-model", action="append",
                        help="the model name of the --expert at the same place (repeat for each; default: the "
                        "first model its server lists). One server can then stand for several experts")
    parser.add_argument("--tokenizer", required=True, help="an expert folder (tokenizer, vocab size)")
    parser.add_argument("--weights", help="comma-separated gate weights (default uniform)")
    parser.add_argument("--served-model-name", default="lockstep-ensemble")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    try:
        settings = LockstepSettings(
            expert_urls=[url.rstrip("/") for url in args.expert], tokenizer_dir=args.tokenizer,
            weights=[float(w) for w in args.weights.split(",")] if args.weights else None,
            served_model_name=args.served_model_name, expert_models=args.expert_model,
        )
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=logging.INFO)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
