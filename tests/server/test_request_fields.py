"""Fields that change the result are honoured, by vLLM's sampler acting on the mixture.

``response_format``, ``structured_outputs`` (and the legacy ``guided_*``),
``logit_bias``, ``min_p``, ``stop_token_ids``, ``include_stop_str_in_output``,
``skip_special_tokens``, ``allowed_token_ids`` and ``prompt_logprobs`` each
change what comes back here; the fields the server cannot honour are refused
(``test_bad_input.py``).

The tiny model likes JSON whitespace (the grammar allows any amount of it), so
the JSON tests bias every whitespace-only token to -100: ``logit_bias`` and the
grammar then act together, and the object closes in a few tokens.
"""

from __future__ import annotations

import json

import jsonschema
import pytest
from server_harness import whitespace_bias

pytestmark = pytest.mark.slow

PROMPT = "def add(a, b):"
CHAT = [{"role": "user", "content": "Pick a color."}]
COLOR_SCHEMA = {
    "type": "object",
    "properties": {"color": {"enum": ["red", "green", "blue"]}, "bright": {"type": "boolean"}},
    "required": ["color", "bright"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def no_whitespace(tokenizer) -> dict[str, int]:
    return whitespace_bias(tokenizer)


@pytest.fixture(scope="module")
def plain_token(tokenizer) -> int:
    """A token that is neither special nor whitespace, and decodes to itself."""
    token = tokenizer("hello").input_ids[-1]
    assert token not in tokenizer.all_special_ids and tokenizer.decode([token]).strip()
    return token


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_json_schema_response_format_constrains_the_mixture(client, server, no_whitespace, seed):
    response = client.chat.completions.create(
        model=server.ensemble,
        messages=CHAT,
        max_tokens=60,
        seed=seed,
        logit_bias=no_whitespace,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "color", "schema": COLOR_SCHEMA, "strict": True},
        },
    )
    choice = response.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    jsonschema.validate(json.loads(choice.message.content), COLOR_SCHEMA)


def test_json_object_and_completions_response_format(client, server, no_whitespace):
    chat = client.chat.completions.create(
        model=server.ensemble, messages=CHAT, max_tokens=80, seed=3, logit_bias=no_whitespace,
        response_format={"type": "json_object"},
    ).choices[0]
    if chat.finish_reason == "stop":  # a free-form object may run long; what came must parse
        assert isinstance(json.loads(chat.message.content), dict)
    else:
        assert chat.message.content.lstrip().startswith("{")
    text = client.completions.create(
        model=server.ensemble, prompt=PROMPT, max_tokens=60, logit_bias=no_whitespace,
        extra_body={"response_format": {"type": "json_schema",
                                        "json_schema": {"name": "c", "schema": COLOR_SCHEMA}}},
    ).choices[0].text
    jsonschema.validate(json.loads(text), COLOR_SCHEMA)


@pytest.mark.parametrize(
    "constraint, check",
    [
        ({"structured_outputs": {"choice": ["alpha", "beta", "gamma"]}},
         lambda text: text in ("alpha", "beta", "gamma")),
        ({"structured_outputs": {"regex": "[0-9]{3}-[a-z]{2}"}},
         lambda text: len(text) == 6 and text[:3].isdigit() and text[3] == "-"),
        ({"guided_choice": ["yes", "no"]}, lambda text: text in ("yes", "no")),  # vLLM's legacy name
        ({"guided_regex": "[A-Z]{4}"}, lambda text: len(text) == 4 and text.isupper()),
    ],
    ids=["choice", "regex", "guided-choice", "guided-regex"],
)
def test_structured_outputs_hold_every_sampled_choice(client, server, constraint, check):
    response = client.completions.create(
        model=server.ensemble, prompt=PROMPT, max_tokens=20, n=3, temperature=1.0, seed=5,
        extra_body=constraint,
    )
    for choice in response.choices:
        assert choice.finish_reason == "stop" and check(choice.text), choice.text


def test_a_large_logit_bias_makes_every_token_that_token(client, server, plain_token):
    response = client.completions.create(
        model=server.ensemble, prompt=PROMPT, max_tokens=6, n=2, temperature=1.0, seed=11,
        logit_bias={str(plain_token): 100}, extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    for choice in response.choices:
        assert choice.model_extra["token_ids"] == [plain_token] * 6
    chat = client.chat.completions.create(
        model=server.ensemble, messages=CHAT, max_tokens=4, logprobs=True,
        logit_bias={str(plain_token): 100}, extra_body={"ignore_eos": True},
    ).choices[0]
    token = chat.logprobs.content[0].token
    assert [entry.token for entry in chat.logprobs.content] == [token] * 4


def test_a_stop_token_id_ends_the_choice(client, server, plain_token):
    common = {"model": server.ensemble, "prompt": PROMPT, "max_tokens": 10,
              "logit_bias": {str(plain_token): 100}}
    stopped = client.completions.create(
        **common, extra_body={"stop_token_ids": [plain_token], "ignore_eos": True}
    )
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.usage.completion_tokens == 1


def test_include_stop_str_in_output_keeps_the_stop_string(client, server, tokenizer, plain_token):
    word = tokenizer.decode([plain_token])
    common = {"model": server.ensemble, "prompt": PROMPT, "max_tokens": 10, "stop": [word],
              "logit_bias": {str(plain_token): 100}}
    without = client.completions.create(**common).choices[0]
    kept = client.completions.create(**common, extra_body={"include_stop_str_in_output": True})
    assert without.finish_reason == "stop" and without.text == ""
    assert kept.choices[0].text == word


def test_skip_special_tokens_false_shows_special_tokens(client, server, tokenizer):
    special = tokenizer.convert_tokens_to_ids("<|assistant|>")
    common = {"model": server.ensemble, "prompt": PROMPT, "max_tokens": 2,
              "logit_bias": {str(special): 100}}
    skipped = client.completions.create(**common, extra_body={"ignore_eos": True}).choices[0]
    shown = client.completions.create(
        **common, extra_body={"ignore_eos": True, "skip_special_tokens": False}
    ).choices[0]
    assert skipped.text == "" and shown.text == "<|assistant|>" * 2


def test_min_p_one_keeps_only_the_most_likely_token(client, server):
    common = {"model": server.ensemble, "prompt": PROMPT, "max_tokens": 8,
              "extra_body": {"ignore_eos": True}}
    greedy = client.completions.create(**common, temperature=0.0).choices[0].text
    sampled = client.completions.create(
        **common | {"extra_body": {"ignore_eos": True, "min_p": 1.0}}, temperature=1.5, seed=3
    ).choices[0].text
    assert sampled == greedy


def test_allowed_token_ids_restrict_the_vocabulary(client, server, tokenizer):
    allowed = tokenizer("red green blue", add_special_tokens=False).input_ids
    choice = client.completions.create(
        model=server.ensemble, prompt=PROMPT, max_tokens=8, temperature=1.0, seed=2,
        extra_body={"allowed_token_ids": allowed, "ignore_eos": True, "return_token_ids": True},
    ).choices[0]
    assert set(choice.model_extra["token_ids"]) <= set(allowed)


def test_prompt_logprobs_score_every_prompt_token(client, server, tokenizer):
    prompt_ids = tokenizer(PROMPT).input_ids
    for create, inputs in (
        (client.completions.create, {"prompt": PROMPT}),
        (client.chat.completions.create, {"messages": CHAT}),
    ):
        response = create(model=server.ensemble, max_tokens=1, **inputs,
                          extra_body={"prompt_logprobs": 2})
        holder = response.choices[0] if "prompt" in inputs else response
        scored = holder.model_extra["prompt_logprobs"]
        assert scored[0] is None and len(scored) == response.usage.prompt_tokens
        for position in scored[1:]:
            assert 1 <= len(position) <= 3  # the top 2 and the prompt's own token
            assert all(entry["logprob"] <= 0 for entry in position.values())
    completion_scores = client.completions.create(
        model=server.ensemble, prompt=PROMPT, max_tokens=1, extra_body={"prompt_logprobs": 0}
    ).choices[0].model_extra["prompt_logprobs"]
    for token_id, position in zip(prompt_ids[1:], completion_scores[1:]):
        assert list(position) == [str(token_id)]


def test_fields_that_change_nothing_are_accepted(client, server):
    response = client.chat.completions.create(
        model=server.ensemble, messages=CHAT, max_tokens=2, user="someone",
        metadata={"team": "eval"}, store=False, tool_choice="none",
        extra_body={"priority": 0, "use_beam_search": False, "best_of": 1},
    )
    assert response.choices[0].finish_reason in ("stop", "length")
