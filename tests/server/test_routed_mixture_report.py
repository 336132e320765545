"""Per-token gate weights in the responses, on the routed session server (``routed_server``).

Its random router's weights change from token to token, so a report that
shifted by one token, or a stream chunk carrying another chunk's weights,
would show against the router run offline.
"""

from __future__ import annotations

import pytest
import torch
from conftest import ENSEMBLE

pytestmark = pytest.mark.slow

PROMPT = "def add(a, b):"
LONG = {"ignore_eos": True}  # exact token counts whatever the random tiny model emits


def offline_weights(offline_router, prompt_ids: list[int], token_ids: list[int]) -> torch.Tensor:
    """``(len(token_ids), K)``: the offline router's weights for each generated token."""
    _mixture, log_weights = offline_router(torch.tensor([prompt_ids + token_ids]))
    start = len(prompt_ids) - 1  # position p decides token p + 1
    return log_weights[0, start : start + len(token_ids)].exp().double()


def test_mixture_report_covers_every_token_with_the_router_s_own_weights(
    routed_client, routed_server, offline_router
):
    """On a random router every token's weights differ, so one token's shift would show."""
    response = routed_client.completions.create(
        model=ENSEMBLE,
        prompt=PROMPT,
        max_tokens=7,
        temperature=0.0,
        logprobs=5,
        extra_body={**LONG, "mixture": {"per_token": True}, "return_token_ids": True,
                    "return_tokens_as_token_ids": True},
    )
    choice = response.choices[0]
    report = choice.model_extra["mixture"]
    assert report["experts"] == routed_server.experts
    per_token = torch.tensor(report["per_token"], dtype=torch.float64)  # (7, K)
    assert per_token.shape == (7, len(routed_server.experts))
    torch.testing.assert_close(per_token.sum(-1), torch.ones(7, dtype=torch.float64), atol=1e-5, rtol=0)
    expected = offline_weights(
        offline_router, choice.model_extra["prompt_token_ids"], choice.model_extra["token_ids"]
    )
    assert expected.std(0).max() > 0.01, "the random router should vary from token to token"
    torch.testing.assert_close(per_token, expected, atol=1e-4, rtol=0)
    # The log-probs are the router's mixture's, the sampled token's and the top 5 alike.
    prompt_ids, token_ids = choice.model_extra["prompt_token_ids"], choice.model_extra["token_ids"]
    mixture = offline_router(torch.tensor([prompt_ids + token_ids]))[0][0]  # (T, V)
    for index, top in enumerate(choice.logprobs.top_logprobs):
        position = len(prompt_ids) - 1 + index
        assert choice.logprobs.tokens[index] == f"token_id:{token_ids[index]}"
        assert len(top) == 5
        for token, logprob in top.items():
            assert abs(logprob - mixture[position, int(token.removeprefix("token_id:"))].item()) < 1e-3
    for k, name in enumerate(report["experts"]):
        assert report["mean_weights"][name] == pytest.approx(expected[:, k].mean().item(), abs=1e-4)
    assert response.model_extra["mixture"] == report  # the top level repeats choice 0


def test_stream_chunks_carry_each_token_s_weights_and_the_running_mean(
    routed_client, routed_server, offline_router
):
    body = {**LONG, "mixture": {"per_token": True}, "return_token_ids": True}
    common = {
        "model": ENSEMBLE,
        "prompt": PROMPT,
        "max_tokens": 6,
        "temperature": 1.0,
        "seed": 9,
        "extra_body": body,
    }
    whole = routed_client.completions.create(**common).choices[0]
    per_token, token_ids, prompt_ids, last = [], [], None, None
    for chunk in routed_client.completions.create(stream=True, **common):
        for choice in chunk.choices:
            report = choice.model_extra["mixture"]
            assert len(report["per_token"]) == len(choice.model_extra["token_ids"])
            per_token += report["per_token"]
            token_ids += choice.model_extra["token_ids"]
            prompt_ids = prompt_ids or choice.model_extra.get("prompt_token_ids")
            last = report
            # The running mean covers every token so far, this chunk's included.
            so_far = torch.tensor(per_token, dtype=torch.float64).mean(0)
            for k, name in enumerate(report["experts"]):
                assert report["mean_weights"][name] == pytest.approx(so_far[k].item(), abs=1e-6)
    assert token_ids == whole.model_extra["token_ids"] and len(token_ids) == 6
    streamed = torch.tensor(per_token, dtype=torch.float64)
    torch.testing.assert_close(
        streamed, torch.tensor(whole.model_extra["mixture"]["per_token"], dtype=torch.float64),
        atol=1e-6, rtol=0,
    )
    torch.testing.assert_close(
        streamed, offline_weights(offline_router, prompt_ids, token_ids), atol=1e-4, rtol=0
    )
    assert last["mean_weights"] == pytest.approx(whole.model_extra["mixture"]["mean_weights"], abs=1e-6)
