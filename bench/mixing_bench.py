"""``gatemix bench mixing``: the mixing step alone, fused against two-pass, side by side.

The engine's ``compute_logits`` turns K experts' logits into the mixture once
per decoded token. This times that step on the shapes it sees (batch N, K
experts, vocabulary V) for the fused form the engine runs (``mix_logits``) and
the two-pass form it replaced (``mix_logits_two_pass``: a materialized K x V
log-softmax, then the mix), and the fused form under ``torch.compile`` (one
generated kernel, what a compiled engine would run), interleaved in one run,
and reports the ratios and the largest difference from the two-pass form.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field

import torch

from gatemix.gate.mixing import mix_logits, mix_logits_two_pass

DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class MixingBenchConfig:
    dtype: str = field(default="float32", metadata={"help": f"dtype of the expert logits: {', '.join(DTYPES)}",
                                                    "choices": DTYPES})
    device: str = field(default="cpu", metadata={"help": "where the mixing runs (cpu, cuda, cuda:1)"})
    repeats: int = field(default=20, metadata={"help": "calls per timing; the median is kept"})
    rounds: int = field(default=3, metadata={"help": "rounds alternating the forms; the best is kept"})
    seed: int = field(default=0, metadata={"help": "seed of the random logits and weights"})
    json: str | None = field(default=None, metadata={"help": "also write the results here"})

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.repeats < 1 or self.rounds < 1:
            raise ValueError("repeats and rounds must be at least 1")

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


@dataclass(frozen=True)
class MixingShape:
    tokens: int
    experts: int
    vocab: int


DEFAULT_SHAPES = (
    MixingShape(16, 3, 4096),
    MixingShape(64, 3, 4096),
    MixingShape(16, 4, 32000),
    MixingShape(64, 4, 32000),
    MixingShape(16, 4, 128256),
)


def synchronize(device: str | torch.device) -> None:
    """Wait for queued CUDA work, so a timing covers the kernels and not only their launch."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn, *args, repeats: int, device: str | torch.device = "cpu") -> float:
    """Median wall time of ``fn(*args)`` over ``repeats`` calls, after one warm-up call."""
    fn(*args)
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def random_mixing_inputs(
    shape: MixingShape,
    generator: torch.Generator,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert logits ``(N, K, V)`` with a real model's spread and normalized log weights ``(N, K)``.

    Drawn on the generator's device, then moved: a CUDA generator keeps the
    large draws off the CPU.
    """
    source = generator.device
    size = (shape.tokens, shape.experts, shape.vocab)
    logits = torch.randn(size, generator=generator, device=source) * 4
    log_weights = torch.log_softmax(
        torch.randn(shape.tokens, shape.experts, generator=generator, device=source), -1
    )
    return logits.to(device=device, dtype=dtype), log_weights.to(device)


def run_mixing_bench(
    shapes: tuple[MixingShape, ...] = DEFAULT_SHAPES,
    *,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    repeats: int = 20,
    rounds: int = 3,
    seed: int = 0,
) -> list[dict]:
    """Median time per call of each form; rounds alternate the two so drift hits both."""
    generator = torch.Generator().manual_seed(seed)
    compiled = torch.compile(mix_logits, dynamic=True)
    time_call = functools.partial(median_seconds, repeats=repeats, device=device)
    rows = []
    for shape in shapes:
        logits, log_weights = random_mixing_inputs(shape, generator, device=device, dtype=dtype)
        start = time.perf_counter()
        compiled(logits, log_weights)
        synchronize(device)
        compile_seconds = time.perf_counter() - start
        fused, two_pass, fused_compiled = [], [], []
        for _ in range(rounds):
            two_pass.append(time_call(mix_logits_two_pass, logits, log_weights))
            fused.append(time_call(mix_logits, logits, log_weights))
            fused_compiled.append(time_call(compiled, logits, log_weights))
        reference = mix_logits_two_pass(logits, log_weights)
        difference = max(
            float((mix_logits(logits, log_weights) - reference).abs().max()),
            float((compiled(logits, log_weights) - reference).abs().max()),
        )
        rows.append(
            {
                "tokens": shape.tokens,
                "experts": shape.experts,
                "vocab": shape.vocab,
                "dtype": str(dtype).removeprefix("torch."),
                "two_pass_ms": 1e3 * min(two_pass),
                "fused_ms": 1e3 * min(fused),
                "compiled_ms": 1e3 * min(fused_compiled),
                "first_compile_s": compile_seconds,
                "speedup": min(two_pass) / min(fused),
                "compiled_speedup": min(two_pass) / min(fused_compiled),
                "max_abs_difference": difference,
            }
        )
    return rows


def format_mixing_bench(rows: list[dict]) -> str:
    lines = [
        "| N tokens | K | vocab | dtype | two-pass ms | fused ms | compiled ms | fused x | compiled x | max abs diff |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['tokens']} | {row['experts']} | {row['vocab']} | {row['dtype']} | "
            f"{row['two_pass_ms']:.3f} | {row['fused_ms']:.3f} | {row['compiled_ms']:.3f} | "
            f"{row['speedup']:.2f}x | {row['compiled_speedup']:.2f}x | "
            f"{row['max_abs_difference']:.1e} |"
        )
    return "\n".join(lines)
