"""Random experts are ordinary Hugging Face folders of the shape asked for, one vocabulary for all."""

from __future__ import annotations

import json

import pytest
import torch

from gatemix.bench.random_experts import (
    ARCHITECTURES,
    ExpertShape,
    tokenizer_vocab_size,
    write_random_experts,
)

SHAPE = ExpertShape(hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                    num_key_value_heads=1, intermediate_size=96, vocab_size=300,
                    max_position_embeddings=128, initializer_range=0.05)


def test_every_architecture_is_written_with_the_shape_and_one_tokenizer(tmp_path):
    from transformers import AutoModelForCausalLM

    folders = write_random_experts(tmp_path, list(ARCHITECTURES), SHAPE, seed=3)
    for folder, architecture in zip(folders, ARCHITECTURES):
        config = json.loads((folder / "config.json").read_text())
        assert (config["hidden_size"], config["num_hidden_layers"], config["num_key_value_heads"],
                config["head_dim"], config["intermediate_size"], config["vocab_size"]) == (
            64, 1, 1, 32, 96, 300), architecture
        assert config["tie_word_embeddings"] is (architecture == "qwen2-tied")
        assert tokenizer_vocab_size(folder) == 300
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        logits = model(torch.tensor([[5, 6, 7]])).logits
        assert logits.shape == (1, 3, 300) and torch.isfinite(logits).all()
    first = AutoModelForCausalLM.from_pretrained(folders[0]).model.embed_tokens.weight
    again = write_random_experts(tmp_path / "again", ["llama"], SHAPE, seed=3)[0]
    assert torch.equal(first, AutoModelForCausalLM.from_pretrained(again).model.embed_tokens.weight)


@pytest.mark.parametrize(("fields", "message"), [
    ({"num_attention_heads": 3}, "not a multiple"),
    ({"num_key_value_heads": 3, "num_attention_heads": 4}, "must divide"),
    ({"num_hidden_layers": 0}, "num_hidden_layers must be positive"),
    ({"vocab_size": 4}, "vocab_size must exceed"),
])
def test_a_shape_that_cannot_be_built_is_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        ExpertShape(**{"hidden_size": 64, "num_attention_heads": 2, **fields})


def test_qwen2_refuses_a_head_size_vllm_would_derive_otherwise(tmp_path):
    from gatemix.bench.random_experts import write_random_expert

    shape = ExpertShape(hidden_size=64, num_attention_heads=4, head_dim=32, vocab_size=300)
    with pytest.raises(ValueError, match="head_dim x num_attention_heads"):
        write_random_expert(tmp_path / "qwen2", "qwen2", shape)
    assert json.loads((write_random_expert(tmp_path / "llama", "llama", shape) / "config.json")
                      .read_text())["head_dim"] == 32
