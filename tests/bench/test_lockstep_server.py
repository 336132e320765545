"""The lockstep baseline is real: real vLLM expert servers, the real mixer, the openai client.

With one-hot weights the lockstep ensemble must generate exactly what vLLM's
own server generates for that expert (greedy), although every step still asks
both experts for their top-20 and mixes them with the tail bucket. With uniform
weights each generated token must be the argmax of the tail-bucket mixture of
the two experts' top-20 lists, fetched independently from their servers.
"""

import json
from pathlib import Path

import httpx
import pytest
import torch
from openai import OpenAI

from gatemix.bench.lockstep_server import TOP_LOGPROBS, mix_top_logprobs
from gatemix.bench.servers import (
    ServerOptions,
    free_port,
    launch,
    lockstep_mixer_command,
    managed_process,
    wait_ready,
)
from gatemix.gate.mixing import log_weights_from_probs

pytestmark = pytest.mark.slow

PROMPT = "Copyright (c) the authors. Permission is hereby granted"
STEPS = 24


@pytest.fixture(scope="module")
def expert_dirs(demo_paths) -> list[str]:
    return [str(path) for path in demo_paths.expert_dirs.values()][:2]


@pytest.fixture(scope="module")
def one_hot_lockstep(expert_dirs, tmp_path_factory):
    options = ServerOptions(max_model_len=256, max_num_seqs=4, kv_cache_gib=1,
                            log_dir=tmp_path_factory.mktemp("lockstep-logs"))
    with launch("lockstep", composite_dir=None, expert_dirs=expert_dirs, options=options,
                lockstep_weights=[1.0, 0.0]) as running:
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
def test_one_hot_lockstep_equals_vllm_greedy_for_that_expert(one_hot_lockstep, expert_dirs, prompt):
    vllm_text, vllm_tokens = _greedy(_client(one_hot_lockstep.expert_urls[0]), expert_dirs[0], prompt)
    text, tokens = _greedy(_client(one_hot_lockstep.base_url), one_hot_lockstep.model_name, prompt)
    assert len(tokens) == STEPS
    assert tokens == vllm_tokens
    assert text == vllm_text


def test_streaming_matches_non_streaming_and_reports_usage(one_hot_lockstep):
    client = _client(one_hot_lockstep.base_url)
    text, _ = _greedy(client, one_hot_lockstep.model_name, PROMPT, max_tokens=8)
    chunks = list(client.completions.create(
        model=one_hot_lockstep.model_name, prompt=PROMPT, max_tokens=8, temperature=0, stream=True,
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


def test_uniform_lockstep_follows_the_tail_bucket_mixture(one_hot_lockstep, expert_dirs, tmp_path):
    urls = one_hot_lockstep.expert_urls
    port = free_port()
    log = tmp_path / "uniform-mixer.log"
    with managed_process(lockstep_mixer_command(urls, expert_dirs[0], port), log) as proc:
        base_url = f"http://127.0.0.1:{port}"
        model = wait_ready(base_url, [proc], [log], timeout_s=120)
        prompt_ids = [5, 17, 42, 99, 7, 300]
        _, tokens = _greedy(_client(base_url), model, prompt_ids, max_tokens=8)
    vocab_size = json.loads((Path(expert_dirs[0]) / "config.json").read_text())["vocab_size"]
    log_weights = log_weights_from_probs(torch.tensor([0.5, 0.5]))
    context = list(prompt_ids)
    for token in tokens:
        tops = [_expert_top_logprobs(url, path, context) for url, path in zip(urls, expert_dirs)]
        assert token == int(mix_top_logprobs(tops, log_weights, vocab_size).argmax())
        context.append(token)
