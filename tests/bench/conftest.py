"""A tiny project for the bench tests: two random experts the CPU backend runs."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="session")
def tiny_project(tmp_path_factory):
    """A project file naming two tiny random experts (llama, qwen2); its data is never read."""
    from gatemix.bench.random_experts import ExpertShape, write_random_experts
    from gatemix.project_writer import write_project_file

    root = tmp_path_factory.mktemp("tiny-project")
    shape = ExpertShape(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        num_key_value_heads=1, intermediate_size=128, vocab_size=512,
                        max_position_embeddings=256)
    folders = write_random_experts(root / "experts", ["llama", "qwen2"], shape)
    data = root / "data.jsonl"
    data.write_text(json.dumps({"text": "w1 w2 w3"}) + "\n")
    experts = {"code": folders[0], "legal": folders[1]}
    return write_project_file(root, name="tiny", experts=experts,
                              data={name: {"files": [data]} for name in experts})
