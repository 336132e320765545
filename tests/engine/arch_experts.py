"""Tiny randomly initialised experts of every architecture the composite must hold.

Each is an ordinary Hugging Face folder written by ``transformers`` (its own
config class, its own weight names), sharing one tokenizer folder, so the
engine loads them exactly as it would a user's fine-tunes. The weights are
drawn with a wide initialiser so the next-token distributions are peaked:
greedy decodes of near-uniform distributions would hinge on float rounding.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

# Shapes the CPU attention backend accepts (head size 32); two layers, GQA (2 heads, 1 KV head).
BASE_SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=32,
    max_position_embeddings=512,
    initializer_range=0.35,
    rms_norm_eps=1e-6,
)

# name -> (transformers config class, what sets it apart)
ARCHITECTURES = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", {"use_sliding_window": False}),  # biases in q/k/v projections
    "qwen3": ("Qwen3Config", {"use_sliding_window": False}),  # RMSNorm on q and k
    "qwen2-tied": ("Qwen2Config", {"use_sliding_window": False, "tie_word_embeddings": True}),
}


def tokenizer_vocab_size(tokenizer_dir: Path) -> int:
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(tokenizer_dir))


def make_expert(
    out_dir: Path, architecture: str, tokenizer_dir: Path, seed: int, **shape_overrides
) -> Path:
    """Write one random-init expert of ``architecture`` with the shared tokenizer; returns its folder."""
    import transformers

    class_name, extra = ARCHITECTURES[architecture]
    vocab_size = tokenizer_vocab_size(tokenizer_dir)
    shape = {**BASE_SHAPE, **shape_overrides}
    config = getattr(transformers, class_name)(
        vocab_size=vocab_size,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        tie_word_embeddings=extra.get("tie_word_embeddings", False),
        **{k: v for k, v in extra.items() if k != "tie_word_embeddings"},
        **shape,
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    for path in Path(tokenizer_dir).iterdir():
        if path.name.startswith("tokenizer") or path.name == "special_tokens_map.json":
            shutil.copy2(path, out_dir / path.name)
    return out_dir
