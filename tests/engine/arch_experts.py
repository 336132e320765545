"""Tiny randomly initialised experts of every architecture the composite must hold.

A thin layer over ``gatemix.bench.random_experts`` (the one writer of random
experts), with the tests' shape: every expert shares one tokenizer folder, and
the weights are drawn with a wide initialiser so the next-token distributions
are peaked: greedy decodes of near-uniform distributions would hinge on float
rounding.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from gatemix.bench.random_experts import (
    ARCHITECTURES,
    ExpertShape,
    tokenizer_vocab_size,
    write_random_expert,
)

__all__ = ["ARCHITECTURES", "BASE_SHAPE", "make_expert", "tokenizer_vocab_size"]

# Shapes the CPU attention backend accepts (head size 32); two layers, GQA (2 heads, 1 KV head).
BASE_SHAPE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 32,
    "max_position_embeddings": 512,
    "initializer_range": 0.35,
    "rms_norm_eps": 1e-6,
}
# The demo tokenizer's special ids, which the tests' tokenizer folders share.
SPECIAL_IDS = {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}
_SHAPE_FIELDS = {field.name for field in dataclasses.fields(ExpertShape)}


def make_expert(
    out_dir: Path, architecture: str, tokenizer_dir: Path, seed: int, **shape_overrides
) -> Path:
    """Write one random-init expert of ``architecture`` with the shared tokenizer; returns its folder.

    ``shape_overrides`` are config fields: the shape's own (``hidden_size``, ...) or any other.
    """
    fields = {**BASE_SHAPE, **shape_overrides}
    shape = ExpertShape(**{key: value for key, value in fields.items() if key in _SHAPE_FIELDS})
    others = {key: value for key, value in fields.items() if key not in _SHAPE_FIELDS}
    return write_random_expert(out_dir, architecture, shape, tokenizer_dir=tokenizer_dir, seed=seed,
                               **{**SPECIAL_IDS, **others})
