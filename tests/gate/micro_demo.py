"""A hand-made micro demo as a project: random tiny Llama experts, a word tokenizer, JSONL splits
and a little out-of-domain text."""

from __future__ import annotations

import json
from pathlib import Path

import torch

WORDS = {
    "code": ["def", "return", "class", "import", "self", "lambda", "yield", "print"],
    "legal": ["court", "shall", "party", "clause", "hereby", "pursuant", "plaintiff", "statute"],
}


def _tokenizer(folder: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for word in sorted({w for words in WORDS.values() for w in words}):
        vocab[word] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<unk>",
    )
    tokenizer.save_pretrained(folder)
    return tokenizer


def micro_demo_project(root: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    generator = torch.Generator().manual_seed(0)
    for index, (domain, words) in enumerate(WORDS.items()):
        folder = root / "experts" / domain
        tokenizer = _tokenizer(folder)
        torch.manual_seed(index)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=64,
            bos_token_id=1,
            eos_token_id=2,
        )
        model = LlamaForCausalLM(config)
        with torch.no_grad():  # make expert j favour its own words, so the domains differ
            own = torch.tensor(tokenizer.convert_tokens_to_ids(words))
            model.lm_head.weight[own] += 0.5 * model.model.norm.weight.sign()
        model.save_pretrained(folder)
        data = root / "data" / domain
        data.mkdir(parents=True)
        for split, count in (("gate", 12), ("eval", 6)):
            lines = []
            for row in range(count):
                picks = torch.randint(len(words), (10,), generator=generator).tolist()
                lines.append(
                    json.dumps({"id": f"{split}-{row}", "text": " ".join(words[p] for p in picks)})
                )
            (data / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    # Text of neither domain: the words of both, shuffled together, for the report's third set.
    mixed = sorted(w for words in WORDS.values() for w in words)
    ood = root / "data" / "out_of_domain.jsonl"
    ood.write_text("".join(
        json.dumps({"text": " ".join(mixed[p] for p in torch.randint(len(mixed), (10,), generator=generator).tolist())})
        + "\n" for _ in range(4)))
    from gatemix.project_writer import write_project_file

    write_project_file(
        root,
        name="micro",
        experts={domain: root / "experts" / domain for domain in WORDS},
        data={
            domain: {split: [root / "data" / domain / f"{split}.jsonl"] for split in ("gate", "eval")}
            for domain in WORDS
        },
        out_of_domain=[ood],
    )
    return root
