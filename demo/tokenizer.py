"""The shared byte-level BPE tokenizer of the demo, saved as a Hugging Face folder.

Every model of the demo (base, experts, monolithic) uses this one tokenizer, so
their next-token distributions are over the same vocabulary and can be mixed.

Special tokens, with fixed ids::

    0 <|bos|>   prepended by the tokenizer to every encoded text
    1 <|eos|>   ends every training document
    2 <|pad|>
    3 <|system|>  4 <|user|>  5 <|assistant|>   chat role markers

Chat template (``chat_template.jinja``, stored in ``tokenizer_config.json``): the
prompt starts with ``<|bos|>``, each message is rendered as
``<|role|>\\n{content}\\n``, and ``add_generation_prompt`` appends
``<|assistant|>\\n``. So ``[{"role": "user", "content": "hi"}]`` becomes
``"<|bos|><|user|>\\nhi\\n<|assistant|>\\n"``. Roles other than system, user and
assistant raise. The template already holds the bos token, so templated prompts
are tokenized with ``add_special_tokens=False`` (what vLLM and
``apply_chat_template`` do).

The demo models are trained on raw documents, not chats: the role markers are
there so a chat request is well formed, not because the models answer well.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from importlib import resources
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = "<|bos|>", "<|eos|>", "<|pad|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, *ROLE_TOKENS)
BOS_ID, EOS_ID, PAD_ID = 0, 1, 2
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
TOKENIZER_FILES = (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE)


def load_chat_template() -> str:
    """The jinja chat template shipped next to this module (see the module docstring)."""
    source = resources.files("gatemix.demo").joinpath("chat_template.jinja")
    return source.read_text(encoding="utf-8").rstrip("\n")


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE over ``texts``; specials get ids 0..5, and every encoding starts
    with ``<|bos|>``. Decoding round-trips any text (bytes, not characters, are the
    base alphabet)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    # Like Llama: bos is added on encode, eos is not (generation must produce it).
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, BOS_ID)],
    )
    for token_id, token in enumerate(SPECIAL_TOKENS):
        if tokenizer.token_to_id(token) != token_id:
            raise RuntimeError(f"special token {token} did not get id {token_id}")
    return tokenizer


def tokenizer_config(model_max_length: int) -> dict:
    """``tokenizer_config.json``: what ``AutoTokenizer`` needs beyond ``tokenizer.json``."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "additional_special_tokens": list(ROLE_TOKENS),
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "padding_side": "left",
        "chat_template": load_chat_template(),
    }


def save_tokenizer(tokenizer: Tokenizer, folder: Path, model_max_length: int) -> None:
    """Write a Hugging Face fast-tokenizer folder (written by hand, so the files do
    not depend on the installed transformers version)."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / TOKENIZER_FILE))
    config = tokenizer_config(model_max_length)
    (folder / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n",
                                                encoding="utf-8")


def load_tokenizer(folder: Path) -> Tokenizer:
    return Tokenizer.from_file(str(Path(folder) / TOKENIZER_FILE))


def tokenizer_sha256(folder: Path) -> str:
    """One hash over the tokenizer files, so a manifest pins the exact tokenizer."""
    digest = hashlib.sha256()
    for name in TOKENIZER_FILES:
        digest.update(name.encode())
        digest.update((Path(folder) / name).read_bytes())
    return digest.hexdigest()
