"""vLLM's endpoints that clients use: /tokenize, /detokenize, /tokenizer_info, /version, /ping, /load.

Same request and response shapes as vLLM's own server, and the same tokens as
the generation endpoints really send: a prompt's ``/tokenize`` count is the
completion's ``usage.prompt_tokens``, for chat messages too.
"""

from __future__ import annotations

import httpx
import pytest
from server_harness import wait_until_idle

pytestmark = pytest.mark.slow

PROMPT = "def add(a, b):"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]


def test_tokenize_counts_what_the_completion_sends(http, client, server, tokenizer):
    tokens = http.post("/tokenize", json={"model": server.ensemble, "prompt": PROMPT}).json()
    assert set(tokens) >= {"count", "max_model_len", "tokens"} and tokens["max_model_len"] == 256
    assert tokens["tokens"] == tokenizer(PROMPT).input_ids and tokens["count"] == len(tokens["tokens"])
    usage = client.completions.create(model=server.ensemble, prompt=PROMPT, max_tokens=1).usage
    assert usage.prompt_tokens == tokens["count"]
    bare = http.post(
        "/tokenize", json={"prompt": PROMPT, "add_special_tokens": False, "return_token_strs": True}
    ).json()
    assert bare["tokens"] == tokens["tokens"][1:]  # no BOS
    assert bare["token_strs"] == tokenizer.convert_ids_to_tokens(bare["tokens"])


def test_tokenize_renders_chat_messages_as_the_chat_endpoint_does(http, client, server):
    tokens = http.post("/tokenize", json={"messages": MESSAGES}).json()
    usage = client.chat.completions.create(
        model=server.ensemble, messages=MESSAGES, max_tokens=1
    ).usage
    assert usage.prompt_tokens == tokens["count"]
    without_prompt = http.post(
        "/tokenize", json={"messages": MESSAGES, "add_generation_prompt": False}
    ).json()
    assert without_prompt["count"] < tokens["count"]


def test_detokenize_inverts_tokenize(http, tokenizer):
    tokens = http.post("/tokenize", json={"prompt": PROMPT, "add_special_tokens": False}).json()
    text = http.post("/detokenize", json={"tokens": tokens["tokens"]}).json()
    assert text == {"prompt": PROMPT}


def test_tokenizer_info_describes_the_tokenizer(http, tokenizer):
    info = http.get("/tokenizer_info").json()
    assert info["tokenizer_class"] == type(tokenizer).__name__
    assert info["eos_token"] == tokenizer.eos_token and info["bos_token"] == tokenizer.bos_token
    assert "{%" in info["chat_template"]
    assert "vocab_file" not in info


@pytest.mark.parametrize(
    "path, body, status, param",
    [
        ("/tokenize", {"prompt": "x", "model": "no-such-model"}, 404, "model"),
        ("/tokenize", {"messages": []}, 400, None),
        ("/tokenize", {"messages": [{"role": "tool", "content": "x"}]}, 400, "messages.0.role"),
        ("/detokenize", {"tokens": [10**9]}, 400, "tokens"),
        ("/detokenize", {"tokens": [-1]}, 400, "tokens.0"),
    ],
)
def test_bad_tokenizer_requests_get_openai_errors(http, path, body, status, param):
    response = http.post(path, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if param is not None:
        assert error["param"] == param
    assert http.post("/tokenize", json={"prompt": "ok"}).status_code == 200


def test_tokenizer_endpoints_need_a_key_when_keys_are_set(server):
    for method, path, body in (("POST", "/tokenize", {"prompt": "x"}),
                               ("POST", "/detokenize", {"tokens": [1]}),
                               ("GET", "/tokenizer_info", None)):
        response = httpx.request(method, server.base_url + path, json=body)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"


def test_version_and_ping_answer_like_vllm(server):
    from vllm.version import __version__ as vllm_version

    version = httpx.get(f"{server.base_url}/version").json()
    assert version["version"] == vllm_version and version["gatemix_version"]
    for method in ("GET", "POST"):
        ping = httpx.request(method, f"{server.base_url}/ping")
        assert ping.status_code == 200 and ping.content == b""


def test_load_counts_the_engine_requests_in_flight_and_needs_no_key(client, server):
    """vLLM's ``/load`` shape; here a choice is an engine request, so ``n=2`` counts 2."""
    stream = client.completions.create(
        model=server.ensemble, prompt=PROMPT, n=2, max_tokens=200, stream=True,
        extra_body={"ignore_eos": True},
    )
    next(iter(stream))
    during = httpx.get(f"{server.base_url}/load").json()
    stream.close()
    wait_until_idle(server.base_url, timeout_s=30)
    assert during == {"server_load": 2}
    assert httpx.get(f"{server.base_url}/load").json() == {"server_load": 0}
