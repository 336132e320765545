"""``python -m gatemix.bench.gpu_check``: the parts of gatemix that run without vLLM, on a device.

The GPU machines lent to development have PyTorch and transformers but no
vLLM, so this checks, in figures, what runs there:

- ``features``: ``HFExpertBank`` scoring in bf16 on the device against fp32 on the CPU;
- ``teacher``: the ``EnsembleTeacher`` mixture, the same comparison;
- ``mixing``: two-pass, fused and compiled ``mix_logits`` against a float64
  reference, timed at real vocabulary sizes;
- ``router``: the ``HiddenStateRouter`` head per step at real hidden sizes.

The experts are random-init models written to a temporary folder (nothing is
downloaded). Each section records its own failure and the next one runs; the
exit status is 1 if a section failed or a figure broke its sanity bound. The
bounds are loose on purpose: they catch a broken dtype or device path, not a
rounding difference, and the figures themselves are the output.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import tempfile
import time
import traceback
from dataclasses import asdict
from pathlib import Path

import torch
from transformers.utils import logging as transformers_logging

from gatemix.bench.gpu_check_config import CheckContext, GpuCheckConfig
from gatemix.bench.gpu_check_support import (
    SECTION_COLUMNS,
    check_bound,
    difference_row,
    dtype_violations,
    environment,
    format_section,
    one_line,
    random_texts,
    row_violations,
    weight_dtype,
)
from gatemix.bench.mixing_bench import MixingShape, median_seconds, random_mixing_inputs
from gatemix.config_cli import add_config_flags, config_from_args
from gatemix.distill.teacher import EnsembleTeacher
from gatemix.errors import UserError
from gatemix.gate.fit.expert_bank import HFExpertBank, pad_sequences
from gatemix.gate.mixing import mix_logits, mix_logits_two_pass, mix_logprobs
from gatemix.gate.router import HiddenStateRouter, RouterForm, context_config_like

logger = logging.getLogger(__name__)

# Loose bounds (max, mean absolute difference) for bf16 on the device against fp32 on the CPU.
BF16_LOGPROB_BOUNDS = (0.5, 0.05)
BF16_HIDDEN_BOUNDS = (1.0, 0.1)
MIXING_ERROR_BOUND = 1e-3  # every form computes in float32, whatever its input dtype
NORMALIZATION_BOUND = 1e-3  # |logsumexp| of a mixture or of the gate's log weights
ROUTER_DEVICE_BOUND = 1e-2  # fp32 head on the device against the CPU (TF32 would show here)


def check_features(context: CheckContext) -> dict:
    """(a) ``HFExpertBank.score`` in bf16 on the device against fp32 on the CPU."""
    sizes, device = context.sizes, context.device
    device_bank = HFExpertBank(context.expert_dirs, device=device, dtype=torch.bfloat16)
    cpu_bank = HFExpertBank(context.expert_dirs, device="cpu", dtype=torch.float32)
    # Uneven lengths, so the batch is padded and the attention mask matters.
    step = sizes.seq_len // 8
    lengths = [sizes.seq_len - 1 - (row % 4) * step for row in range(sizes.sequences)]
    texts = random_texts(sizes.experts.vocab, lengths, context.generator())
    input_ids, attention_mask = pad_sequences(cpu_bank.tokenize(texts, sizes.seq_len))
    checked = device_bank.score(input_ids, attention_mask)
    reference = cpu_bank.score(input_ids, attention_mask)
    scored = reference.token_mask.bool()  # (B, T-1)
    rows = [
        difference_row("next-token log-prob", checked.next_logprobs[scored],
                       reference.next_logprobs[scored], BF16_LOGPROB_BOUNDS),
        difference_row("final hidden state", checked.hidden[scored], reference.hidden[scored],
                       BF16_HIDDEN_BOUNDS),
    ]
    batch = input_ids.shape[0]
    device_ms = median_seconds(device_bank.score, input_ids, attention_mask,
                               repeats=context.config.repeats, device=device)
    cpu_ms = median_seconds(cpu_bank.score, input_ids, attention_mask,
                            repeats=context.config.cpu_repeats)
    figures = {
        "architectures": [model.config.model_type for model in cpu_bank.models],
        "params_per_expert": [
            sum(param.numel() for param in model.parameters()) for model in cpu_bank.models
        ],
        "device_weight_dtype": weight_dtype(device_bank.models),
        "sequences": batch,
        "scored_tokens": int(scored.sum()),
        "device_ms_per_sequence": 1e3 * device_ms / batch,
        "cpu_fp32_ms_per_sequence": 1e3 * cpu_ms / batch,
    }
    violations = row_violations(rows) + dtype_violations(device_bank.models, torch.bfloat16)
    return {"rows": rows, "figures": figures, "violations": violations}


def _teacher_router(context: CheckContext):
    """A random router with a hidden layer and a one-layer context model: every teacher path."""
    expert_config = json.loads((context.expert_dirs[0] / "config.json").read_text())
    torch.manual_seed(context.config.seed)
    form = RouterForm(
        num_experts=len(context.expert_dirs),
        hidden_size=context.sizes.experts.hidden,
        router_hidden=64,
        context_config=context_config_like(expert_config, num_layers=1),
    )
    return HiddenStateRouter(form)


def check_teacher(context: CheckContext) -> dict:
    """(b) ``EnsembleTeacher`` in bf16 on the device against fp32 on the CPU."""
    sizes, device = context.sizes, context.device
    router = _teacher_router(context)
    device_teacher = EnsembleTeacher.from_experts(
        context.expert_dirs, copy.deepcopy(router), device=device, dtype=torch.bfloat16
    )
    cpu_teacher = EnsembleTeacher.from_experts(context.expert_dirs, router, device="cpu")
    input_ids = torch.randint(
        1, sizes.experts.vocab, (sizes.sequences, sizes.seq_len), generator=context.generator()
    )
    mixture, log_weights = device_teacher(input_ids)  # (B, T, V), (B, T, K)
    reference_mixture, reference_log_weights = cpu_teacher(input_ids)
    rows = [
        difference_row("mixture log-prob", mixture, reference_mixture, BF16_LOGPROB_BOUNDS),
        difference_row("gate log-weight", log_weights, reference_log_weights, BF16_LOGPROB_BOUNDS),
    ]
    mixture_norm = float(torch.logsumexp(mixture, -1).abs().max())
    gate_norm = float(torch.logsumexp(log_weights, -1).abs().max())
    batch = input_ids.shape[0]
    device_ms = median_seconds(
        device_teacher, input_ids, repeats=context.config.repeats, device=device
    )
    cpu_ms = median_seconds(cpu_teacher, input_ids, repeats=context.config.cpu_repeats)
    figures = {
        "output_device": str(mixture.device),
        "max_abs_logsumexp_mixture": mixture_norm,
        "max_abs_logsumexp_gate": gate_norm,
        "gate_weight_spread": float(log_weights.exp().std(dim=(0, 1)).max()),
        "device_ms_per_sequence": 1e3 * device_ms / batch,
        "cpu_fp32_ms_per_sequence": 1e3 * cpu_ms / batch,
    }
    violations = row_violations(rows) + dtype_violations(device_teacher.experts, torch.bfloat16)
    check_bound(violations, "device mixture |logsumexp|", mixture_norm, NORMALIZATION_BOUND)
    check_bound(violations, "device gate |logsumexp|", gate_norm, NORMALIZATION_BOUND)
    return {"rows": rows, "figures": figures, "violations": violations}


class CompiledMixing:
    """``torch.compile(mix_logits)`` that remembers its first failure and then stands aside."""

    def __init__(self) -> None:
        self.compiled = torch.compile(mix_logits, dynamic=True)
        self.error: str | None = None

    def first_call(self, logits: torch.Tensor, log_weights: torch.Tensor) -> torch.Tensor | None:
        if self.error is not None:
            return None
        try:
            return self.compiled(logits, log_weights)
        except Exception as exc:  # noqa: BLE001 - no Triton, no C++ compiler: report, go on
            self.error = one_line(exc)
            logger.warning("torch.compile(mix_logits) failed: %s", self.error)
            return None


def _mixing_row(context: CheckContext, shape: MixingShape, dtype, compiled, generator) -> dict:
    device, repeats = context.device, context.config.repeats
    logits, log_weights = random_mixing_inputs(shape, generator, device=device, dtype=dtype)
    # The reference of the very inputs (bf16 values are exact in float64), so the
    # error is the computation's, not the input rounding's.
    reference = mix_logprobs(torch.log_softmax(logits.double(), -1), log_weights.double())
    row = {"tokens": shape.tokens, "experts": shape.experts, "vocab": shape.vocab,
           "dtype": str(dtype).removeprefix("torch.")}
    for name, form in (("two_pass", mix_logits_two_pass), ("fused", mix_logits)):
        row[f"{name}_error"] = float((form(logits, log_weights).double() - reference).abs().max())
        seconds = median_seconds(form, logits, log_weights, repeats=repeats, device=device)
        row[f"{name}_ms"] = 1e3 * seconds
    row["compiled_error"] = row["compiled_ms"] = None
    if compiled is not None:
        start = time.perf_counter()
        mixture = compiled.first_call(logits, log_weights)
        row["compiled_first_call_s"] = time.perf_counter() - start  # includes any (re)compile
        if mixture is not None:
            row["compiled_error"] = float((mixture.double() - reference).abs().max())
            row["compiled_ms"] = 1e3 * median_seconds(
                compiled.compiled, logits, log_weights, repeats=repeats, device=device
            )
    return row


def check_mixing(context: CheckContext) -> dict:
    """(c) The mixing step: two-pass, fused, compiled, against float64, timed."""
    sizes = context.sizes
    compiled = CompiledMixing() if context.config.compile else None
    generator = context.generator(context.device)
    shapes = [
        MixingShape(sizes.mixing_tokens, experts, vocab)
        for vocab in sizes.vocabs
        for experts in sizes.mixture_sizes
    ]
    rows = [
        _mixing_row(context, shape, dtype, compiled, generator)
        for dtype in (torch.float32, torch.bfloat16)
        for shape in shapes
    ]
    violations: list[str] = []
    for row in rows:
        for form in ("two_pass", "fused", "compiled"):
            label = f"{form} error, K={row['experts']} V={row['vocab']} {row['dtype']}"
            check_bound(violations, label, row[f"{form}_error"], MIXING_ERROR_BOUND)
    figures = {
        "compile": "off" if compiled is None else (compiled.error or "ok"),
        "compile_seconds": max(row.get("compiled_first_call_s") or 0.0 for row in rows),
    }
    return {"rows": rows, "figures": figures, "violations": violations}


def check_router(context: CheckContext) -> dict:
    """(d) The router head, fp32, per step of ``router_tokens`` tokens on the device."""
    sizes, device = context.sizes, context.device
    generator = context.generator()
    rows, violations = [], []
    for experts in sizes.mixture_sizes:
        for router_hidden in (0, 256):
            torch.manual_seed(context.config.seed)
            form = RouterForm(
                num_experts=experts, hidden_size=sizes.router_width, router_hidden=router_hidden
            )
            cpu_router = HiddenStateRouter(form).eval()
            router = copy.deepcopy(cpu_router).to(device)
            features = torch.randn(
                sizes.router_tokens, experts * sizes.router_width, generator=generator
            )  # (N, K*H)
            device_features = features.to(device)
            with torch.no_grad():
                log_weights = router.head(device_features)  # (N, K)
                difference = float((log_weights.cpu() - cpu_router.head(features)).abs().max())
                seconds = median_seconds(router.head, device_features,
                                         repeats=context.config.repeats, device=device)
            row = {"experts": experts, "hidden_size": sizes.router_width,
                   "router_hidden": router_hidden, "tokens": sizes.router_tokens,
                   "ms_per_step": 1e3 * seconds, "cpu_max_abs_diff": difference,
                   "max_abs_logsumexp": float(torch.logsumexp(log_weights, -1).abs().max())}
            rows.append(row)
            label = f"K={experts} router_hidden={router_hidden}"
            check_bound(violations, f"{label} device vs cpu", difference, ROUTER_DEVICE_BOUND)
            check_bound(
                violations, f"{label} |logsumexp|", row["max_abs_logsumexp"], NORMALIZATION_BOUND
            )
    return {"rows": rows, "figures": {}, "violations": violations}


SECTIONS = {
    "features": check_features,
    "teacher": check_teacher,
    "mixing": check_mixing,
    "router": check_router,
}


def run_section(name: str, context: CheckContext) -> dict:
    start = time.perf_counter()
    try:
        result = {**SECTIONS[name](context), "error": None}
    except Exception as exc:  # noqa: BLE001 - a failed section is reported; the next runs
        traceback.print_exc()
        result = {"rows": [], "figures": {}, "violations": [], "error": one_line(exc)}
    result["ok"] = result["error"] is None and not result["violations"]
    result["seconds"] = time.perf_counter() - start
    print(format_section(name, result, SECTION_COLUMNS[name]), flush=True)
    return result


def write_report(report: dict, path: str | None) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(report, indent=2))


def run_gpu_check(config: GpuCheckConfig) -> dict:
    """Each chosen section in turn; the JSON is rewritten after each (a killed run leaves some)."""
    start = time.perf_counter()
    # "module": where gatemix was imported from (the staged copy, the checkout or an install).
    machine = {**environment(config.device), "module": __file__}
    report = {"config": asdict(config), "environment": machine, "sections": {}}
    print(" ".join(f"{key}={value}" for key, value in report["environment"].items()), flush=True)
    with tempfile.TemporaryDirectory(prefix="gatemix-gpu-check-") as scratch:
        context = CheckContext(config, Path(scratch))
        for name in config.sections:
            report["sections"][name] = run_section(name, context)
            write_report(report, config.out)
    report["failed"] = [name for name, result in report["sections"].items() if not result["ok"]]
    # A check that imported vLLM would prove nothing about a machine without it.
    report["vllm_imported"] = sys.modules.get("vllm") is not None
    report["total_seconds"] = time.perf_counter() - start
    write_report(report, config.out)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gatemix.bench.gpu_check", description=__doc__.splitlines()[0]
    )
    add_config_flags(parser, GpuCheckConfig)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args, GpuCheckConfig)
    except UserError as exc:
        print(f"gpu_check: error: {exc}", file=sys.stderr)
        return 2
    transformers_logging.disable_progress_bar()
    report = run_gpu_check(config)
    failed = ", ".join(report["failed"] + ["vllm imported"] * report["vllm_imported"]) or "none"
    print(f"== total {report['total_seconds']:.1f} s; failed sections: {failed}", flush=True)
    return 1 if report["failed"] or report["vllm_imported"] else 0


if __name__ == "__main__":
    sys.exit(main())
