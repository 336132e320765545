"""The server through the official ``openai`` client: completions, chat, streaming, logprobs."""

from __future__ import annotations

import math

import pytest

pytestmark = pytest.mark.slow

PROMPT = "def add(a, b):"
LONG = {"ignore_eos": True}  # exact token counts whatever the random tiny model emits


def stream_text(stream) -> tuple[dict[int, str], dict[int, str | None], object]:
    """Texts and finish reasons per choice index, and the usage chunk's usage."""
    texts: dict[int, str] = {}
    reasons: dict[int, str | None] = {}
    usage = None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            piece = choice.text if hasattr(choice, "text") else (choice.delta.content or "")
            texts[choice.index] = texts.get(choice.index, "") + piece
            reasons[choice.index] = choice.finish_reason or reasons.get(choice.index)
    return texts, reasons, usage


def test_models_lists_the_ensemble_and_each_expert(client, server):
    ids = [model.id for model in client.models.list().data]
    assert ids[0] == server.ensemble
    assert len(server.experts) >= 1 and ids[1:] == server.experts


def test_a_model_is_retrieved_as_its_card_in_the_list(client, server):
    import openai

    listed = {card.id: card for card in client.models.list().data}
    for name in (server.ensemble, *server.experts):
        card = client.models.retrieve(name)
        assert card.model_dump(exclude={"created"}) == listed[name].model_dump(exclude={"created"})
    assert client.models.retrieve(server.ensemble).experts == server.experts  # the extension
    with pytest.raises(openai.NotFoundError) as error:
        client.models.retrieve("no-such-model")
    assert error.value.body["code"] == "model_not_found" and error.value.body["param"] == "model"


def test_completion_has_text_usage_and_finish_reason(client, server):
    response = client.completions.create(
        model=server.ensemble, prompt=PROMPT, max_tokens=5, extra_body=LONG
    )
    choice = response.choices[0]
    assert response.object == "text_completion" and response.model == server.ensemble
    assert isinstance(choice.text, str) and choice.finish_reason == "length"
    assert response.usage.completion_tokens == 5
    assert (
        response.usage.total_tokens == response.usage.prompt_tokens + 5
        and response.usage.prompt_tokens > 0
    )


def test_chat_completion_answers_as_assistant(client, server):
    response = client.chat.completions.create(
        model=server.ensemble,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}],
        max_completion_tokens=4,
        extra_body=LONG,
    )
    assert response.object == "chat.completion"
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].finish_reason == "length" and response.usage.completion_tokens == 4


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_streaming_and_non_streaming_agree_with_the_same_seed(client, server, endpoint):
    common = {
        "model": server.ensemble,
        "max_tokens": 12,
        "temperature": 1.0,
        "seed": 1234,
        "extra_body": LONG,
    }
    if endpoint == "completions":
        create, inputs = client.completions.create, {"prompt": PROMPT}
    else:
        create, inputs = (
            client.chat.completions.create,
            {"messages": [{"role": "user", "content": "Hi"}]},
        )
    whole = create(**inputs, **common)
    texts, reasons, usage = stream_text(
        create(**inputs, **common, stream=True, stream_options={"include_usage": True})
    )
    expected = (
        whole.choices[0].text if endpoint == "completions" else whole.choices[0].message.content
    )
    assert texts[0] == expected
    assert reasons[0] == whole.choices[0].finish_reason == "length"
    assert usage.model_dump() == whole.usage.model_dump()


def test_n_choices_use_seed_plus_index(client, server):
    common = {
        "model": server.ensemble,
        "prompt": PROMPT,
        "max_tokens": 8,
        "temperature": 1.0,
        "extra_body": LONG,
    }
    three = client.completions.create(n=3, seed=40, **common)
    assert [choice.index for choice in three.choices] == [0, 1, 2]
    assert three.usage.completion_tokens == 24
    assert (
        three.usage.prompt_tokens
        == client.completions.create(n=1, seed=40, **common).usage.prompt_tokens
    )
    for i in range(3):  # choice i of seed s is the single choice of seed s + i
        single = client.completions.create(n=1, seed=40 + i, **common)
        assert single.choices[0].text == three.choices[i].text
    texts, _, _ = stream_text(client.completions.create(n=3, seed=40, stream=True, **common))
    assert [texts[i] for i in range(3)] == [choice.text for choice in three.choices]


def test_stop_string_ends_the_choice_before_it(client, server):
    common = {
        "model": server.ensemble,
        "prompt": PROMPT,
        "max_tokens": 20,
        "temperature": 0.0,
        "extra_body": LONG,
    }
    free = client.completions.create(**common).choices[0].text
    cut = next(
        i
        for i in range(len(free) // 2, len(free) - 1)
        if free[i : i + 2].strip() and "\ufffd" not in free[i : i + 2]
    )
    stop = free[cut : cut + 2]
    stopped = client.completions.create(stop=[stop], **common).choices[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == free[: free.index(stop)]


def test_generation_logprobs_have_the_right_shape_and_match_prompt_scoring(client, server):
    k = 3
    generated = client.completions.create(
        model=server.ensemble,
        prompt=PROMPT,
        max_tokens=6,
        temperature=0.0,
        logprobs=k,
        extra_body={**LONG, "return_token_ids": True},
    ).choices[0]
    logprobs = generated.logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 6
    assert logprobs.text_offset == sorted(logprobs.text_offset) and logprobs.text_offset[0] == 0
    for chosen, top in zip(logprobs.token_logprobs, logprobs.top_logprobs):
        assert 1 <= len(top) <= k and chosen <= 0
        assert chosen == pytest.approx(max(top.values()), abs=1e-5)  # greedy picks the argmax
    prompt_ids, token_ids = (
        generated.model_extra["prompt_token_ids"],
        generated.model_extra["token_ids"],
    )
    assert len(token_ids) == 6
    # Scoring prompt + generation in one pass gives the same log-probs as generating it.
    scored = (
        client.completions.create(
            model=server.ensemble,
            prompt=prompt_ids + token_ids,
            max_tokens=0,
            echo=True,
            logprobs=k,
        )
        .choices[0]
        .logprobs
    )
    assert scored.token_logprobs[-6:] == pytest.approx(logprobs.token_logprobs, abs=1e-3)


def test_echo_with_zero_max_tokens_scores_the_prompt(client, server, tokenizer):
    response = client.completions.create(
        model=server.ensemble, prompt=PROMPT, max_tokens=0, echo=True, logprobs=1
    )
    choice = response.choices[0]
    n_prompt = len(tokenizer(PROMPT).input_ids)
    assert choice.text == PROMPT
    assert response.usage.prompt_tokens == n_prompt and response.usage.completion_tokens == 0
    # Every prompt token is listed, special ones (a BOS the tokenizer adds) included.
    assert len(choice.logprobs.tokens) == n_prompt
    assert "".join(choice.logprobs.tokens).endswith(PROMPT)
    assert choice.logprobs.token_logprobs[0] is None
    assert all(lp is not None and lp <= 0 for lp in choice.logprobs.token_logprobs[1:])


def test_chat_logprobs_list_each_token_with_its_top_alternatives(client, server):
    response = client.chat.completions.create(
        model=server.ensemble,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=5,
        temperature=0.0,
        logprobs=True,
        top_logprobs=2,
        extra_body=LONG,
    )
    content = response.choices[0].logprobs.content
    assert len(content) == 5
    for token in content:
        assert len(token.top_logprobs) == 2
        assert token.logprob == pytest.approx(token.top_logprobs[0].logprob, abs=1e-5)
        assert math.isfinite(token.logprob) and token.logprob <= 0


def mean_weights(choice_or_response) -> dict[str, float]:
    return choice_or_response.model_extra["mixture"]["mean_weights"]


def test_pinned_weights_are_followed_and_reported(client, server):
    first, *others = server.experts
    one_hot = client.completions.create(
        model=server.ensemble,
        prompt=PROMPT,
        max_tokens=4,
        extra_body={**LONG, "mixture": {"weights": {first: 1}}},
    )
    assert mean_weights(one_hot.choices[0])[first] == pytest.approx(1.0, abs=1e-6)
    if others:
        pinned = {first: 0.7, others[0]: 0.3}
        response = client.completions.create(
            model=server.ensemble,
            prompt=PROMPT,
            max_tokens=4,
            extra_body={**LONG, "mixture": {"weights": pinned}},
        )
        for name, weight in mean_weights(response.choices[0]).items():
            assert weight == pytest.approx(pinned.get(name, 0.0), abs=1e-6)


def test_expert_model_equals_the_ensemble_pinned_to_that_expert(client, server):
    for expert in server.experts:
        common = {"prompt": PROMPT, "max_tokens": 6, "temperature": 0.0, "logprobs": 2}
        alone = client.completions.create(model=expert, **common, extra_body=LONG).choices[0]
        pinned = client.completions.create(
            model=server.ensemble,
            **common,
            extra_body={**LONG, "mixture": {"weights": {expert: 1.0}}},
        ).choices[0]
        restricted = client.completions.create(
            model=server.ensemble, **common, extra_body={**LONG, "mixture": {"experts": [expert]}}
        ).choices[0]
        assert alone.text == pinned.text == restricted.text
        assert alone.logprobs.token_logprobs == pytest.approx(
            pinned.logprobs.token_logprobs, abs=1e-5
        )
        assert restricted.logprobs.token_logprobs == pytest.approx(
            pinned.logprobs.token_logprobs, abs=1e-5
        )
        assert mean_weights(alone)[expert] == pytest.approx(1.0, abs=1e-6)
        assert mean_weights(restricted)[expert] == pytest.approx(1.0, abs=1e-6)


def test_several_prompts_get_choices_in_prompt_order(client, server):
    response = client.completions.create(
        model=server.ensemble, prompt=["one", "two words"], max_tokens=3, n=2, extra_body=LONG
    )
    assert [choice.index for choice in response.choices] == [0, 1, 2, 3]
    assert response.usage.completion_tokens == 12


def _requests_total(http, model: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(http.get("/metrics").text):
        if family.name == "gatemix_requests":
            for sample in family.samples:
                if sample.name == "gatemix_requests_total" and sample.labels.get("model") == model:
                    return sample.value
    return 0.0


def test_metrics_count_finished_requests(client, server, http):
    """The counter moves by the choices finished (n of them), not just shows its HELP line."""
    before = _requests_total(http, server.ensemble)
    client.completions.create(model=server.ensemble, prompt=PROMPT, max_tokens=2, n=3)
    assert _requests_total(http, server.ensemble) == before + 3
    expert = server.experts[0]
    expert_before = _requests_total(http, expert)
    client.completions.create(model=expert, prompt=PROMPT, max_tokens=2)
    assert _requests_total(http, expert) == expert_before + 1
    assert _requests_total(http, server.ensemble) == before + 3
