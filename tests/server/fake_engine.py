"""A fake of what the serving layer calls on vLLM, for the fast tier of serving tests.

``FakeEngine`` stands in for vLLM's ``AsyncLLM`` (``generate`` yielding delta
``RequestOutput``-like objects, ``abort``, the configs ``SamplingParams.verify``
reads), ``FakeTokenizer`` for the tokenizer (one token per character) and
``FakeReceiver`` for the gate-trace receiver, which the fake engine feeds the
per-token gate weights the way the vLLM workers do. Everything is
deterministic, so a test can compare a response with what the fake produced.

``serving_app`` wires them into the real serving classes and routes, without
an engine process, a model folder or the demo build; ``stream_chunks`` reads
a streamed response back, checking its SSE framing.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass, field
from types import SimpleNamespace

import jinja2
from fastapi import FastAPI
from vllm.logprobs import Logprob

from gatemix.engine.request_gates import GATE_ARGS_KEY
from gatemix.server.chat_template import ChatRenderer
from gatemix.server.errors import install_error_handlers
from gatemix.server.limits import Admission, LimitsMiddleware
from gatemix.server.metrics import GateMetrics
from gatemix.server.routes import router
from gatemix.server.served_models import ServedModels
from gatemix.server.serving import ServingEngine
from gatemix.server.serving_chat import OpenAIServingChat
from gatemix.server.serving_completion import OpenAIServingCompletion
from gatemix.server.serving_responses import OpenAIServingResponses, ResponseStore
from gatemix.server.settings import Settings
from gatemix.server.tools import ToolCalling

SCRIPT = "Hello there. The end."  # what the fake model says to every prompt, then EOS
VOCAB = 128  # token id = the character's code point (ASCII)
MAX_MODEL_LEN = 256
ENSEMBLE = "ens"
EXPERTS = ["code", "legal", "tech"]
GATE_VERSION = "v1"
# The gate's own weights at token i: BASE_WEIGHTS rotated by i, so every token differs.
BASE_WEIGHTS = [0.5, 0.3, 0.2]


class FakeTokenizer:
    """One token per character; no special tokens."""

    chat_template = None  # the renderer falls back to gatemix's template

    def __call__(self, text: str, add_special_tokens: bool = True):
        return SimpleNamespace(input_ids=[ord(char) for char in text])

    def decode(self, token_ids, **_kwargs) -> str:
        return "".join(chr(token_id) for token_id in token_ids)

    def convert_ids_to_tokens(self, token_ids) -> list[str]:
        return [chr(token_id) for token_id in token_ids]

    def apply_chat_template(
        self, messages, *, chat_template, add_generation_prompt, tools, tokenize
    ):
        template = jinja2.Environment().from_string(chat_template)
        return template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            bos_token="",
        )


class FakeReceiver:
    """The gate-trace receiver: weights recorded per trace id, for registered ids only."""

    address = "ipc://fake-gate-trace"

    def __init__(self) -> None:
        self.traces: dict[str, dict[int, list[float]]] = {}

    def new_trace_id(self) -> str:
        trace_id = uuid.uuid4().hex
        self.traces[trace_id] = {}
        return trace_id

    def record(self, trace_id: str, token_index: int, weights: list[float]) -> None:
        if trace_id in self.traces:
            self.traces[trace_id][token_index] = weights

    async def wait_for(self, trace_id, num_tokens, start=0, timeout=5.0, output_ids=None):
        trace = self.traces.get(trace_id, {})
        if any(i not in trace for i in range(start, num_tokens)):
            return None
        return [trace[i] for i in range(start, num_tokens)]

    def release(self, trace_id: str) -> None:
        self.traces.pop(trace_id, None)


def gate_weights(gate_args: dict, token_index: int) -> list[float]:
    """(K,) what the fake gate gives token ``token_index``: the pins, else its own weights
    restricted to the expert subset and renormalized."""
    if gate_args.get("weights") is not None:
        return list(gate_args["weights"])
    shift = token_index % len(BASE_WEIGHTS)
    weights = BASE_WEIGHTS[shift:] + BASE_WEIGHTS[:shift]
    mask = gate_args.get("experts_mask") or [True] * len(weights)
    kept = [w if m else 0.0 for w, m in zip(weights, mask)]
    return [w / sum(kept) for w in kept]


def planned_output(params) -> tuple[list[int], str, str]:
    """``(token ids, text, vLLM finish reason)`` of SCRIPT under ``params``' limits."""
    text = SCRIPT[: params.max_tokens]
    reason = "length" if params.max_tokens < len(SCRIPT) else "stop"
    token_count, shown = len(text), text
    for stop in params.stop or []:
        at = text.find(stop)
        if at >= 0 and at + len(stop) <= token_count:
            token_count, reason = at + len(stop), "stop"
            shown = text[: token_count if params.include_stop_str_in_output else at]
    return [ord(char) for char in text[:token_count]], shown, reason


def _position(token_id: int, num_top: int) -> dict:
    """One position's logprobs: the chosen token at rank 1, then the next ids."""
    return {
        (token_id + rank - 1) % VOCAB: Logprob(
            logprob=-0.1 * rank, rank=rank, decoded_token=chr((token_id + rank - 1) % VOCAB)
        )
        for rank in range(1, max(num_top, 1) + 1)
    }


@dataclass
class FakeEngine:
    """vLLM's AsyncLLM as the serving layer sees it; records what it was asked."""

    receiver: FakeReceiver
    step_delay_s: float = 0.0  # > 0: a slow engine, for the deadline tests
    params: dict[str, object] = field(default_factory=dict)  # request id -> its SamplingParams
    produced: dict[str, list[int]] = field(default_factory=dict)  # request id -> token ids
    aborted: list[str] = field(default_factory=list)
    tokenizer: FakeTokenizer = field(default_factory=FakeTokenizer)
    errored: bool = False

    def __post_init__(self) -> None:
        self.model_config = SimpleNamespace(
            max_logprobs=20,
            get_vocab_size=lambda: VOCAB,
            is_diffusion=False,
            max_model_len=MAX_MODEL_LEN,
        )
        self.vllm_config = SimpleNamespace(speculative_config=None, structured_outputs_config=None)

    async def generate(self, prompt: dict, params, request_id: str):
        self.params[request_id] = params
        self.produced[request_id] = []
        gate_args = (params.extra_args or {}).get(GATE_ARGS_KEY, {})
        token_ids, text, reason = planned_output(params)
        prompt_ids = prompt["prompt_token_ids"]
        prompt_positions = None
        if params.prompt_logprobs is not None:
            prompt_positions = [None] + [
                _position(t, params.prompt_logprobs) for t in prompt_ids[1:]
            ]
        for i, token_id in enumerate(token_ids):
            await asyncio.sleep(self.step_delay_s)
            self.produced[request_id].append(token_id)
            if "trace_id" in gate_args:
                self.receiver.record(gate_args["trace_id"], i, gate_weights(gate_args, i))
            last = i == len(token_ids) - 1
            completion = SimpleNamespace(
                token_ids=[token_id],
                text=text[i] if i < len(text) and not last else text[i:],
                logprobs=None
                if params.logprobs is None
                else [_position(token_id, params.logprobs)],
                finish_reason=reason if last else None,
            )
            yield SimpleNamespace(
                outputs=[completion],
                finished=last,
                prompt_logprobs=prompt_positions if i == 0 else None,
            )

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def get_num_unfinished_requests(self) -> int:
        return 0


@dataclass
class ServingStack:
    app: FastAPI
    engine: FakeEngine
    receiver: FakeReceiver
    core: ServingEngine
    metrics: GateMetrics


def serving_app(*, step_delay_s: float = 0.0, **settings) -> ServingStack:
    """The real serving classes and routes around the fakes (no lifespan: nothing to start)."""
    receiver = FakeReceiver()
    engine = FakeEngine(receiver, step_delay_s=step_delay_s)
    models = ServedModels(ENSEMBLE, EXPERTS, GATE_VERSION, 0.0, True, "/fake")
    metrics = GateMetrics(EXPERTS, GATE_VERSION, 0.0)
    server_settings = Settings(**{"max_n": 4, **settings})
    core = ServingEngine(
        engine=engine,
        tokenizer=engine.tokenizer,
        models=models,
        receiver=receiver,
        metrics=metrics,
        settings=server_settings,
        vocab_size=VOCAB,
        max_model_len=MAX_MODEL_LEN,
    )
    renderer = ChatRenderer(engine.tokenizer)
    tools = ToolCalling(tokenizer=engine.tokenizer, renderer=renderer, parser_name=None)
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(router)
    app.add_middleware(LimitsMiddleware, max_body_bytes=server_settings.max_body_bytes)
    state = app.state
    state.admission = Admission(capacity=16, retry_after_s=1)
    state.settings, state.engine, state.models, state.metrics = (
        server_settings,
        engine,
        models,
        metrics,
    )
    state.serving_core = core
    state.serving_completion = OpenAIServingCompletion(core=core)
    state.serving_chat = OpenAIServingChat(core=core, renderer=renderer, tools=tools)
    state.serving_responses = OpenAIServingResponses(chat=state.serving_chat, store=ResponseStore())
    return ServingStack(app, engine, receiver, core, metrics)


# ---------------------------------------------------------------- reading a stream


def sse_events(response) -> list[str]:
    """The data of each server-sent event, checking the framing on the way."""
    assert response.headers["content-type"].startswith("text/event-stream")
    blocks = response.text.split("\n\n")
    assert blocks[-1] == "", "the stream ends with a blank line"
    assert all(block.startswith("data: ") for block in blocks[:-1])
    return [block[len("data: ") :] for block in blocks[:-1]]


def stream_chunks(response) -> list[dict]:
    events = sse_events(response)
    assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    return [json.loads(event) for event in events[:-1]]
