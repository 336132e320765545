"""The shared tokenizer: ids, round trip, and the Hugging Face folder."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from gatemix.demo.tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    SPECIAL_TOKENS,
    load_tokenizer,
    save_tokenizer,
    train_tokenizer,
)

TEXTS = [
    "def add(a, b):\n    return a + b\n" * 3,
    "Permission is hereby granted, free of charge, to any person obtaining a copy.\n" * 3,
    "The for statement is used to iterate over the elements of a sequence.\n" * 3,
]
SAMPLES = ["", "plain words", "  leading spaces\n\ttabs\r\n", "ünïcödé, 漢字 and 🙂",
           "<|user|> markers <|eos|> inside"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    save_tokenizer(train_tokenizer(TEXTS, vocab_size=400), folder, model_max_length=512)
    return folder


def test_special_tokens_have_fixed_ids(tokenizer_dir):
    tokenizer = load_tokenizer(tokenizer_dir)
    assert [tokenizer.token_to_id(token) for token in SPECIAL_TOKENS] == list(range(6))
    assert tokenizer.encode("hi").ids[0] == BOS_ID


@pytest.mark.parametrize("text", SAMPLES)
def test_decoding_round_trips_text(tokenizer_dir, text):
    tokenizer = load_tokenizer(tokenizer_dir)
    ids = tokenizer.encode(text).ids
    assert tokenizer.decode(ids, skip_special_tokens=False) == "<|bos|>" + text


@pytest.mark.parametrize("text", SAMPLES)
def test_auto_tokenizer_gives_identical_ids(tokenizer_dir, text):
    hf_tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert hf_tokenizer(text)["input_ids"] == load_tokenizer(tokenizer_dir).encode(text).ids


def test_auto_tokenizer_knows_the_special_tokens(tokenizer_dir):
    hf_tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert (hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id,
            hf_tokenizer.pad_token_id) == (BOS_ID, EOS_ID, PAD_ID)
    assert hf_tokenizer.model_max_length == 512
    assert hf_tokenizer.decode(hf_tokenizer("a b\n")["input_ids"],
                               skip_special_tokens=True) == "a b\n"


def test_chat_template_renders_roles_and_generation_prompt(tokenizer_dir):
    hf_tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    prompt = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                              tokenize=False)
    assert prompt == "<|bos|><|system|>\nBe brief.\n<|user|>\nhi\n<|assistant|>\n"
    ids = hf_tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert ids[:2] == [BOS_ID, 3] and ids.count(BOS_ID) == 1


def test_chat_template_refuses_unknown_roles(tokenizer_dir):
    hf_tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    with pytest.raises(Exception, match="roles must be"):
        hf_tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)
