"""What ``gatemix.bench.gpu_check`` checks with (sizes, random experts) and how it reports.

The experts are random-init causal LMs sharing one vocabulary, written as
ordinary Hugging Face folders by ``gatemix.bench.random_experts``: a machine
with no network cannot download experts, and a check of the numerics needs no
trained ones. Three architectures (Llama, Qwen2, Mistral), one width so one
router reads them all, and a word-level tokenizer built in code;
``HFExpertBank`` and ``EnsembleTeacher`` load them the way they load real experts.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from gatemix.bench.random_experts import (
    SPECIAL_TOKENS,
    ExpertShape,
    write_random_expert,
    write_word_tokenizer,
)


@dataclass(frozen=True)
class ExpertSizes:
    vocab: int  # tokenizer and model vocabulary, special tokens included
    hidden: int  # the same for every expert: the router concatenates their states
    layers: int
    heads: int
    intermediate: int
    # Wider than the usual 0.02, so the random experts' next-token distributions
    # are not flat and bf16 rounding shows in the log-probs (~1e-2), as it does
    # in trained models.
    initializer_range: float = 0.05


@dataclass(frozen=True)
class CheckSizes:
    experts: ExpertSizes
    sequences: int  # batch scored by the experts and the teacher
    seq_len: int
    vocabs: tuple[int, ...]  # mixing
    mixture_sizes: tuple[int, ...]  # K, for mixing and the router
    mixing_tokens: int
    router_width: int  # each expert's hidden size H
    router_tokens: int


FULL_SIZES = CheckSizes(
    experts=ExpertSizes(vocab=4096, hidden=256, layers=2, heads=4, intermediate=688),
    sequences=32, seq_len=256, vocabs=(32000, 128256, 151936), mixture_sizes=(2, 4, 8),
    mixing_tokens=256, router_width=4096, router_tokens=256,
)
TINY_SIZES = CheckSizes(
    experts=ExpertSizes(vocab=256, hidden=32, layers=1, heads=2, intermediate=64),
    sequences=4, seq_len=16, vocabs=(512,), mixture_sizes=(2, 3),
    mixing_tokens=16, router_width=64, router_tokens=256,
)


def expert_shapes(sizes: ExpertSizes) -> list[tuple[str, ExpertShape]]:
    """Three architectures of one width and vocabulary: MHA Llama, GQA Qwen2, GQA Mistral."""
    shared = {
        "vocab_size": sizes.vocab, "hidden_size": sizes.hidden, "num_hidden_layers": sizes.layers,
        "num_attention_heads": sizes.heads, "max_position_embeddings": 1024,
        "initializer_range": sizes.initializer_range,
    }
    return [
        ("llama", ExpertShape(**shared, intermediate_size=sizes.intermediate)),
        ("qwen2", ExpertShape(**shared, intermediate_size=sizes.intermediate, num_key_value_heads=1)),
        ("mistral", ExpertShape(**shared, intermediate_size=2 * sizes.intermediate,
                                num_key_value_heads=max(1, sizes.heads // 2))),
    ]


def write_random_experts(root: Path, sizes: ExpertSizes, *, seed: int = 0) -> list[Path]:
    """Write the three random experts under ``root`` (fp32 safetensors); returns their folders."""
    tokenizer_dir = write_word_tokenizer(root / "tokenizer", sizes.vocab)
    return [
        write_random_expert(root / f"{architecture}-{index}", architecture, shape,
                            tokenizer_dir=tokenizer_dir, seed=seed + index)
        for index, (architecture, shape) in enumerate(expert_shapes(sizes))
    ]


def random_texts(vocab_size: int, lengths: list[int], generator: torch.Generator) -> list[str]:
    """One text of random vocabulary words per length (no special tokens)."""
    first_word = len(SPECIAL_TOKENS)
    texts = []
    for length in lengths:
        words = torch.randint(first_word, vocab_size, (length,), generator=generator)
        texts.append(" ".join(f"w{int(word) - first_word}" for word in words))
    return texts


def difference_row(
    quantity: str, checked: torch.Tensor, reference: torch.Tensor, bounds: tuple[float, float]
) -> dict:
    """Max and mean absolute difference of two same-shape tensors, and their (max, mean) bounds."""
    error = (checked.detach().cpu().double() - reference.detach().cpu().double()).abs()
    return {
        "quantity": quantity,
        "max_abs_diff": float(error.max()),
        "mean_abs_diff": float(error.mean()),
        "bound_max": bounds[0],
        "bound_mean": bounds[1],
    }


def check_bound(violations: list[str], label: str, value: float | None, limit: float) -> None:
    if value is not None and not value <= limit:  # NaN breaks every bound
        violations.append(f"{label} = {value:.3g}, bound {limit:g}")


def row_violations(rows: list[dict]) -> list[str]:
    violations: list[str] = []
    for row in rows:
        check_bound(violations, f"{row['quantity']} max", row["max_abs_diff"], row["bound_max"])
        check_bound(violations, f"{row['quantity']} mean", row["mean_abs_diff"], row["bound_mean"])
    return violations


def weight_dtype(models) -> str:
    return str(next(models[0].parameters()).dtype).removeprefix("torch.")


def dtype_violations(models, expected: torch.dtype) -> list[str]:
    found = weight_dtype(models)
    wanted = str(expected).removeprefix("torch.")
    return [] if found == wanted else [f"weights loaded as {found}, asked for {wanted}"]


# (header, key, format) per column of each section's table.
SECTION_COLUMNS = {
    "features": [("quantity", "quantity", "s"), ("max abs diff", "max_abs_diff", ".2e"),
                 ("mean abs diff", "mean_abs_diff", ".2e"), ("bound max", "bound_max", "g")],
    "mixing": [("N", "tokens", "d"), ("K", "experts", "d"), ("vocab", "vocab", "d"),
               ("dtype", "dtype", "s"), ("two-pass ms", "two_pass_ms", ".3f"),
               ("fused ms", "fused_ms", ".3f"), ("compiled ms", "compiled_ms", ".3f"),
               ("two-pass err", "two_pass_error", ".1e"), ("fused err", "fused_error", ".1e"),
               ("compiled err", "compiled_error", ".1e")],
    "router": [("K", "experts", "d"), ("H", "hidden_size", "d"), ("hidden", "router_hidden", "d"),
               ("tokens", "tokens", "d"), ("ms/step", "ms_per_step", ".3f"),
               ("vs cpu", "cpu_max_abs_diff", ".1e"), ("|lse|", "max_abs_logsumexp", ".1e")],
}
SECTION_COLUMNS["teacher"] = SECTION_COLUMNS["features"]


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    lines = ["| " + " | ".join(header for header, _, _ in columns) + " |",
             "|" + "---|" * len(columns)]
    for row in rows:
        cells = [
            "-" if row.get(key) is None else format(row[key], spec) for _, key, spec in columns
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def one_line(exc: BaseException) -> str:
    """An exception as its type and the first non-empty line of its message."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0].strip()}" if lines else type(exc).__name__


def format_section(name: str, result: dict, columns: list[tuple[str, str, str]]) -> str:
    """A section's status, its table and figures, and what broke."""
    status = "ok" if result["ok"] else "FAILED"
    lines = [f"== {name}: {status} ({result['seconds']:.1f} s)"]
    if result["rows"]:
        lines.append(format_table(result["rows"], columns))
    for key, value in result["figures"].items():
        lines.append(f"  {key}: {format(value, '.4g') if isinstance(value, float) else value}")
    lines += [f"  bound broken: {violation}" for violation in result["violations"]]
    if result["error"]:
        lines.append(f"  error: {result['error']}")
    return "\n".join(lines)


def environment(device: str) -> dict:
    """What ran the check: versions, the device's name and where gatemix came from."""
    cuda = torch.device(device).type == "cuda"
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "device": device,
        "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
    }
