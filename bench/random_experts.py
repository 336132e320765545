"""Randomly initialised causal LMs of a chosen architecture and size, as Hugging Face folders.

Each expert is written by ``transformers`` itself (its own config class, its
own weight names), so vLLM and ``HFExpertBank`` load it exactly as they load a
user's fine-tune. Three jobs need experts nobody trained: the GPU check
(numerics need no trained weights, and its machines cannot download any), the
engine benchmark (E at sizes where compute dominates, not only the tiny demo)
and the engine tests (every architecture the composite must hold).

Experts of one call share a tokenizer folder, so their vocabularies agree and
they can be mixed; without one, a word-level tokenizer over ``w0 .. wN`` is
built in code. ``cached_random_experts`` keeps them under a folder named by a
hash of their spec, so a rerun with the same shape reuses them.

Nothing here imports vLLM or ``gatemix.engine``: the GPU check runs where
vLLM is not installed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from gatemix.atomic_write import atomic_folder

# transformers (and tokenizers) are imported inside the functions that write models:
# `gatemix bench --help` imports this module for its shapes, and transformers costs seconds.

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")  # the word tokenizer's ids 0..3; words follow

# name -> (transformers config class, what sets it apart)
ARCHITECTURES = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", {"use_sliding_window": False}),  # biases in q/k/v projections
    "qwen3": ("Qwen3Config", {"use_sliding_window": False}),  # RMSNorm on q and k
    "qwen2-tied": ("Qwen2Config", {"use_sliding_window": False, "tie_word_embeddings": True}),
}
# vLLM's Qwen2 derives the head size from hidden_size / heads and ignores head_dim.
DERIVED_HEAD_DIM = ("qwen2", "qwen2-tied")
TOKENIZER_EXTRA_FILES = ("special_tokens_map.json", "chat_template.jinja", "vocab.json", "merges.txt")
SPEC_FILE = "random_expert.json"  # what was asked for, next to the weights
CACHE_FORMAT = 1  # bump when the written folders change, so old caches are not reused


@dataclass(frozen=True)
class ExpertShape:
    """The size of one expert, in the names of the Hugging Face configs."""

    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    intermediate_size: int = 128
    num_key_value_heads: int | None = None  # None: as many as attention heads (MHA)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    vocab_size: int | None = None  # None: the tokenizer's; required when a tokenizer is built
    initializer_range: float = 0.02
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        sizes = {
            "hidden_size": self.hidden_size, "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position_embeddings,
        }
        for name, value in sizes.items():
            if value < 1:
                raise ValueError(f"{name} must be positive, got {value}")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of "
                             f"num_attention_heads {self.num_attention_heads}; give head_dim")
        if self.head_dim is not None and self.head_dim < 1:
            raise ValueError(f"head_dim must be positive, got {self.head_dim}")
        kv_heads = self.kv_heads
        if kv_heads < 1 or self.num_attention_heads % kv_heads:
            raise ValueError(f"num_key_value_heads {kv_heads} must divide "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.vocab_size is not None and self.vocab_size <= len(SPECIAL_TOKENS):
            raise ValueError(f"vocab_size must exceed {len(SPECIAL_TOKENS)}, got {self.vocab_size}")
        if not self.initializer_range > 0 or not self.rms_norm_eps > 0:
            raise ValueError("initializer_range and rms_norm_eps must be positive")

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def attention_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def config_fields(self) -> dict:
        """The config keyword arguments, defaults resolved; the vocabulary is the caller's."""
        fields = asdict(self)
        fields.pop("vocab_size")
        # Always explicit: Qwen3's config defaults head_dim to 128 whatever the width.
        fields.update(num_key_value_heads=self.kv_heads, head_dim=self.attention_head_dim)
        return fields


def write_word_tokenizer(folder: str | Path, vocab_size: int) -> Path:
    """A whitespace word-level tokenizer over ``w0 .. w{n}``, saved as a fast tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    for index in range(vocab_size - len(SPECIAL_TOKENS)):
        vocab[f"w{index}"] = len(vocab)
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        pad_token="<pad>",
    )
    fast.save_pretrained(folder)
    return Path(folder)


def tokenizer_vocab_size(tokenizer_dir: str | Path) -> int:
    """Every id the tokenizer can produce, added tokens included."""
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(tokenizer_dir))


def _special_token_ids(tokenizer_dir: Path) -> dict:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id}


def copy_tokenizer(tokenizer_dir: Path, out_dir: Path) -> None:
    for path in tokenizer_dir.iterdir():
        if path.is_file() and (path.name.startswith("tokenizer") or path.name in TOKENIZER_EXTRA_FILES):
            shutil.copy2(path, out_dir / path.name)


def check_architecture(architecture: str, shape: ExpertShape) -> None:
    """Refuse an architecture we cannot write, or a shape vLLM would build differently."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; choose from {', '.join(ARCHITECTURES)}")
    if (architecture in DERIVED_HEAD_DIM
            and shape.attention_head_dim * shape.num_attention_heads != shape.hidden_size):
        raise ValueError(f"{architecture}: head_dim x num_attention_heads must equal hidden_size "
                         "(vLLM's Qwen2 derives the head size from them)")


def expert_config(architecture: str, shape: ExpertShape, *, vocab_size: int, **overrides):
    """The ``transformers`` config of one expert; ``overrides`` are config fields and win."""
    import transformers

    check_architecture(architecture, shape)
    class_name, extra = ARCHITECTURES[architecture]
    fields = {"tie_word_embeddings": False, **extra, **shape.config_fields(),
              "vocab_size": vocab_size, **overrides}
    return getattr(transformers, class_name)(**fields)


def write_random_expert(
    out_dir: str | Path,
    architecture: str,
    shape: ExpertShape = ExpertShape(),
    *,
    tokenizer_dir: str | Path | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    **config_overrides,
) -> Path:
    """Write one random-init expert into ``out_dir`` (replaced if it exists); returns the folder.

    With ``tokenizer_dir`` its tokenizer files are copied in, the vocabulary is
    the tokenizer's (``shape.vocab_size``, if given, must cover it) and the
    special ids are the tokenizer's; without one a word tokenizer of
    ``shape.vocab_size`` words is written in.
    """
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    if tokenizer_dir is None:
        if shape.vocab_size is None:
            raise ValueError("give shape.vocab_size or a tokenizer folder")
        write_word_tokenizer(out_dir, shape.vocab_size)
        tokenizer_dir = out_dir
    else:
        tokenizer_dir = Path(tokenizer_dir)
        copy_tokenizer(tokenizer_dir, out_dir)
    vocab_size = tokenizer_vocab_size(tokenizer_dir)
    if shape.vocab_size is not None:
        if shape.vocab_size < vocab_size:
            raise ValueError(f"vocab_size {shape.vocab_size} is below the tokenizer's {vocab_size}")
        vocab_size = shape.vocab_size
    config = expert_config(architecture, shape, vocab_size=vocab_size,
                           **{**_special_token_ids(tokenizer_dir), **config_overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(out_dir)
    del model
    return out_dir


def write_random_experts(
    root: str | Path,
    architectures: Sequence[str],
    shape: ExpertShape,
    *,
    tokenizer_dir: str | Path | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> list[Path]:
    """One expert per architecture under ``root`` (``<arch>-<i>``, seed ``seed + i``), one tokenizer.

    Without ``tokenizer_dir`` the shared word tokenizer is written to ``root/tokenizer``.
    """
    root = Path(root)
    if tokenizer_dir is None:
        tokenizer_dir = write_word_tokenizer(root / "tokenizer", _required_vocab(shape))
    return [
        write_random_expert(root / f"{architecture}-{index}", architecture, shape,
                            tokenizer_dir=tokenizer_dir, seed=seed + index, dtype=dtype)
        for index, architecture in enumerate(architectures)
    ]


def _required_vocab(shape: ExpertShape) -> int:
    if shape.vocab_size is None:
        raise ValueError("give shape.vocab_size or a tokenizer folder")
    return shape.vocab_size


# ---- the cache ----

def _tokenizer_digest(tokenizer_dir: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(tokenizer_dir.iterdir()):
        if path.is_file() and (path.name.startswith("tokenizer") or path.name in TOKENIZER_EXTRA_FILES):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def random_experts_spec(architecture: str, shape: ExpertShape, *, seed: int, dtype: torch.dtype,
                        tokenizer_dir: str | Path | None = None) -> dict:
    """What determines the experts' weights (the count does not: expert i is the same for any K)."""
    import transformers

    return {
        "format": CACHE_FORMAT,
        "architecture": architecture,
        "shape": asdict(shape),
        "seed": seed,
        "dtype": str(dtype).removeprefix("torch."),
        "tokenizer": _tokenizer_digest(Path(tokenizer_dir)) if tokenizer_dir else "word-level",
        "transformers": transformers.__version__,  # its initialisers draw the weights
    }


def spec_key(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def cached_random_experts(
    cache_root: str | Path,
    count: int,
    architecture: str,
    shape: ExpertShape,
    *,
    tokenizer_dir: str | Path | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> list[Path]:
    """``count`` experts under ``cache_root/<hash of the spec>/expert-<i>``, written only when missing.

    Each folder is written beside its final place and renamed into it, so a
    folder that exists is complete and an interrupted run leaves no half expert.
    """
    if count < 1:
        raise ValueError(f"count must be positive, got {count}")
    check_architecture(architecture, shape)
    spec = random_experts_spec(architecture, shape, seed=seed, dtype=dtype, tokenizer_dir=tokenizer_dir)
    root = Path(cache_root) / spec_key(spec)
    root.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is None:
        tokenizer_dir = root / "tokenizer"
        if not tokenizer_dir.is_dir():
            _write_atomically(tokenizer_dir, lambda out: write_word_tokenizer(out, _required_vocab(shape)))
    folders = []
    for index in range(count):
        folder = root / f"expert-{index}"
        if folder.is_dir():
            logger.info("reusing random expert %s", folder)
        else:
            logger.info("writing random %s expert %s", architecture, folder)

            def write(out: Path, index: int = index) -> None:
                write_random_expert(out, architecture, shape, tokenizer_dir=tokenizer_dir,
                                    seed=seed + index, dtype=dtype)
                (out / SPEC_FILE).write_text(json.dumps({**spec, "index": index}, indent=1) + "\n")

            _write_atomically(folder, write)
        folders.append(folder)
    return folders


def _write_atomically(target: Path, write) -> None:
    """``write(staging)`` into a sibling folder, then rename it to ``target``."""
    with atomic_folder(target) as staging:
        write(staging)
