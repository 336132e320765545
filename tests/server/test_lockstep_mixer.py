"""The lockstep baseline's mixer against real servers, driven by the openai client.

The routed session server stands for the experts' servers: each of its per-expert
models (``code``, ``legal``) is that expert alone, served by vLLM, so one server
gives the mixer two experts to call with ``--expert-model``. With one-hot
weights the lockstep ensemble must generate exactly what the server generates
for that expert (greedy), although every step still asks both experts for their
top-20 and mixes them with the tail bucket. With uniform weights each generated
token must be the argmax of the tail-bucket mixture of the two experts' top-20
lists, fetched independently. (``gatemix bench serve`` starts plain vLLM servers
for its lockstep system; that launch is vLLM's own command and is not started here.)
"""

import contextlib
import json
from pathlib import Path

import httpx
import pytest
import torch
from openai import OpenAI

from gatemix.bench.lockstep_server import TOP_LOGPROBS, mix_top_logprobs
from gatemix.bench.servers import free_port, lockstep_mixer_command, managed_process, wait_ready
from gatemix.gate.mixing import log_weights_from_probs

pytestmark = pytest.mark.slow

PROMPT = "Copyright (c) the authors. Permission is hereby granted"
STEPS = 24
EXPERTS = ["code", "legal"]


@contextlib.contextmanager
def _mixer(routed_server, log_dir: Path, weights: list[float] | None):
    """A running lockstep mixer over the routed server's code and legal experts: its URL and model name."""
    port = free_port()
    log = log_dir / f"mixer-{port}.log"
    command = lockstep_mixer_command([routed_server.base_url] * len(EXPERTS), str(routed_server.model_dir), port,
                                     weights, EXPERTS)
    with managed_process(command, log) as process:
        base_url = f"http://127.0.0.1:{port}"
        yield base_url, wait_ready(base_url, [process], [log], timeout_s=120)


@pytest.fixture(scope="module")
def one_hot(routed_server, tmp_path_factory):
    with _mixer(routed_server, tmp_path_factory.mktemp("lockstep"), [1.0, 0.0]) as running:
        yield running


def _client(base_url: str) -> OpenAI:
    return OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=300)


def _greedy(client: OpenAI, model: str, prompt, max_tokens: int = STEPS):
    choice = client.completions.create(
        model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
        extra_body={"return_token_ids": True, "ignore_eos": True},
    ).choices[0]
    return choice.text, list(choice.token_ids)


@pytest.mark.parametrize("prompt", [PROMPT, [5, 17, 42, 99, 7, 300]], ids=["text", "token-ids"])
def test_one_hot_lockstep_equals_the_server_s_greedy_for_that_expert(one_hot, routed_server, prompt):
    base_url, model = one_hot
    expert_text, expert_tokens = _greedy(_client(routed_server.base_url), EXPERTS[0], prompt)
    text, tokens = _greedy(_client(base_url), model, prompt)
    assert len(tokens) == STEPS
    assert tokens == expert_tokens
    assert text == expert_text


def test_streaming_matches_non_streaming_and_reports_usage(one_hot):
    base_url, model = one_hot
    client = _client(base_url)
    text, _ = _greedy(client, model, PROMPT, max_tokens=8)
    chunks = list(client.completions.create(
        model=model, prompt=PROMPT, max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    ))
    token_chunks = [c for c in chunks if c.choices]
    assert len(token_chunks) == 8  # one event per token, as the load generator's ITL assumes
    assert "".join(c.choices[0].text for c in token_chunks) == text
    assert token_chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 8


def _expert_top_logprobs(url: str, model: str, token_ids: list[int]) -> dict[int, float]:
    body = httpx.post(f"{url}/v1/completions", timeout=60, json={
        "model": model, "prompt": token_ids, "max_tokens": 1, "temperature": 0,
        "logprobs": TOP_LOGPROBS, "return_tokens_as_token_ids": True,
    }).json()
    top = body["choices"][0]["logprobs"]["top_logprobs"][0]
    return {int(key.split(":")[1]): value for key, value in top.items()}


def test_uniform_lockstep_follows_the_tail_bucket_mixture(routed_server, tmp_path):
    prompt_ids = [5, 17, 42, 99, 7, 300]
    with _mixer(routed_server, tmp_path, None) as (base_url, model):
        _, tokens = _greedy(_client(base_url), model, prompt_ids, max_tokens=8)
    vocab_size = json.loads((Path(routed_server.model_dir) / "config.json").read_text())["vocab_size"]
    log_weights = log_weights_from_probs(torch.tensor([0.5, 0.5]))
    context = list(prompt_ids)
    for token in tokens:
        tops = [_expert_top_logprobs(routed_server.base_url, expert, context) for expert in EXPERTS]
        assert tops[0] != tops[1]  # two experts, not one
        assert token == int(mix_top_logprobs(tops, log_weights, vocab_size).argmax())
        context.append(token)
