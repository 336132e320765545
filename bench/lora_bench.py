"""``gatemix bench lora``: K LoRA experts of one base against the same K merged into full experts.

A user with K adapters of one base can serve them as a LoRA composite (the base
once, each expert's low-rank factors, ``engine/lora_composite_model.py``) or
merge each into a full model and serve today's composite of K full experts.
Both serve the same mixture; this bench puts them side by side in one run:

* the weights of each, counted from the safetensors headers (nothing loaded):
  on disk, and as the engine holds them (the LoRA composite stacks each vLLM
  projection's factors and pads them to the largest rank, ``lora_layers``);
* an estimate of the weight bytes read per decode step (K models, against the
  base once plus every expert's factors): what a memory-bound decode pays;
* decode tokens/s at each concurrency, both engines alive and timed in
  alternating rounds on the same prompts, so a drift of the machine moves both;
* the peak resident memory of each engine's processes over those rounds.

The models are random-init (speed and memory do not care what was learnt) and
written once under ``--cache-dir``: the base, K adapters with random ``A`` and
``B``, and each adapter merged into the base by ``peft`` itself. Both systems
compute the same K row blocks through the same widths; they differ in the
weights they read, and in the LoRA composite's extra low-rank matmuls.
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from gatemix.adapter_folder import ADAPTER_MODULES, ADAPTER_WEIGHTS, read_adapter
from gatemix.atomic_write import atomic_folder
from gatemix.bench.engine_bench import ENGINE_DTYPES
from gatemix.bench.engine_timing import random_requests, timed_tps
from gatemix.bench.random_adapters import (
    ALL_LINEAR_MODULES,
    ATTENTION_MODULES,
    write_random_lora_adapter,
)
from gatemix.bench.random_experts import (
    ExpertShape,
    cached_random_experts,
    copy_tokenizer,
    spec_key,
)
from gatemix.config_cli import field_help
from gatemix.engine.composite_folder import adapter_dir
from gatemix.engine.engine_config import EngineSettings, engine_kwargs, stopping

logger = logging.getLogger(__name__)

LORA_BASES = ("llama", "mistral", "qwen2", "qwen3")  # the Llama family the LoRA composite builds
TARGETS = {"all-linear": ALL_LINEAR_MODULES, "attention": ATTENTION_MODULES}
SYSTEMS = ("LoRA composite", "merged composite")
# Bytes per parameter in the engine; the bench writes its models in float32, which "auto" keeps.
ELEMENT_BYTES = {"auto": 4, "float32": 4, "bfloat16": 2, "float16": 2}
EMBEDDING = "model.embed_tokens.weight"
WEIGHT_TARGET = 1.3  # the target: the LoRA composite's weights <= 1.3x one expert's


@dataclass
class LoRABenchConfig:
    adapters: int = field(default=4, **field_help("K: LoRA adapters of the one base, each an expert"))
    rank: int = field(default=16, **field_help("rank of every adapter"))
    alpha: float = field(default=32.0, **field_help("lora_alpha of every adapter"))
    targets: str = field(default="all-linear", **field_help(
        "the projections adapted: all-linear (q/k/v/o and gate/up/down) or attention (q/k/v/o)",
        choices=tuple(TARGETS)))
    architecture: str = field(default="llama", **field_help(
        f"the base's architecture: {', '.join(LORA_BASES)}", choices=LORA_BASES))
    hidden_size: int = field(default=1024, **field_help("the base's hidden size"))
    layers: int = field(default=4, **field_help("the base's decoder layers"))
    heads: int = field(default=16, **field_help("attention heads (head size: hidden size / heads, >= 32 on CPU)"))
    kv_heads: int | None = field(default=None, **field_help("KV heads (None: as many as heads)"))
    intermediate_size: int = field(default=2816, **field_help("MLP width"))
    vocab_size: int = field(default=8000, **field_help(
        "vocabulary (a word tokenizer); small, so that the decoder layers, which LoRA adapts, dominate"))
    concurrency: tuple[int, ...] = field(default=(1, 16), **field_help("sequences decoded at once, one point each"))
    prompt_len: int = field(default=32, **field_help("prompt tokens per sequence"))
    output_len: int = field(default=64, **field_help("generated tokens per sequence (EOS ignored)"))
    repeats: int = field(default=3, **field_help("paired rounds per concurrency (the order alternates)"))
    dtype: str = field(default="float32", **field_help(
        f"engine dtype: {', '.join(ENGINE_DTYPES)}", choices=ENGINE_DTYPES))
    kv_cache_gib: int = field(default=1, **field_help("CPU only: each engine's KV cache in GiB"))
    seed: int = field(default=0, **field_help("the base's seed; adapter i is drawn with seed + i"))
    cache_dir: str = field(default=".cache/bench-lora", **field_help(
        "the base, adapters, merged experts and both composites are written under it, reused when present"))
    json: str | None = field(default=None, **field_help("also write the results here"))

    def __post_init__(self) -> None:
        if self.adapters < 1 or self.rank < 1 or not self.alpha > 0:
            raise ValueError("adapters and rank must be positive integers, alpha a positive number")
        if not self.concurrency or min(self.concurrency) < 1:
            raise ValueError(f"concurrency takes positive integers, got {self.concurrency}")
        if self.prompt_len < 1 or self.output_len < 1 or self.repeats < 1 or self.kv_cache_gib < 1:
            raise ValueError("prompt_len, output_len, repeats and kv_cache_gib must be positive")
        for name, allowed in (("targets", tuple(TARGETS)), ("architecture", LORA_BASES), ("dtype", ENGINE_DTYPES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        shape = self.shape()  # the shape's own checks (widths, heads)
        if shape.attention_head_dim < 32:
            raise ValueError(f"head size {shape.attention_head_dim} < 32: vLLM's CPU attention needs >= 32")
        if self.max_model_len > shape.max_position_embeddings:
            raise ValueError(f"prompt + output exceed the base's context of {shape.max_position_embeddings}")

    def shape(self) -> ExpertShape:
        return ExpertShape(hidden_size=self.hidden_size, num_hidden_layers=self.layers,
                           num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
                           intermediate_size=self.intermediate_size, vocab_size=self.vocab_size)

    @property
    def max_model_len(self) -> int:
        return self.prompt_len + self.output_len + 16


# ---- weight bytes, from the safetensors headers ----

def safetensors_header(path: str | Path) -> dict[str, dict]:
    """``name -> {"dtype", "shape", "data_offsets"}`` from a safetensors file's JSON header alone."""
    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    return header


def folder_tensors(folder: str | Path) -> dict[str, dict]:
    """The headers of every ``*.safetensors`` directly in ``folder`` (subfolders are not read)."""
    tensors = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        tensors.update(safetensors_header(path))
    return tensors


def parameter_bytes(tensors: dict[str, dict], element_bytes: int | None = None) -> int:
    """Bytes of the tensors: as stored (``None``) or at ``element_bytes`` per parameter (the engine's dtype)."""
    if element_bytes is None:
        return sum(end - start for start, end in (t["data_offsets"] for t in tensors.values()))
    return element_bytes * sum(math.prod(t["shape"]) for t in tensors.values())


def decode_read_tensors(tensors: dict[str, dict]) -> dict[str, dict]:
    """The tensors one decode step reads in full: all but the input embeddings, of which it reads a
    row per token; a tied embedding is also the LM head, and read. Works on prefixed names
    (``experts.{k}.model.embed_tokens.weight``) too."""
    read = {}
    for name, tensor in tensors.items():
        prefix = name.removesuffix(EMBEDDING)
        if name.endswith(EMBEDDING) and f"{prefix}lm_head.weight" in tensors:
            continue
        read[name] = tensor
    return read


def stacked_factor_parameters(base: dict[str, dict], adapters: list[dict[tuple[int, str], tuple]]) -> int:
    """Parameters of K adapters' factors as the LoRA composite holds them (``lora_layers.stack_factors``).

    ``base``: the base's headers; ``adapters[k]``: ``(layer, module) -> (shape of A, shape of B)``.
    Per vLLM projection (q/k/v stacked, gate/up stacked), ``A`` is ``(K, in, R)`` and ``B`` is
    ``(K, R, sum of outputs)``, ``R`` the largest expert's summed rank over the stacked modules.
    """
    from gatemix.engine.lora_layers import STACKED_PROJECTIONS  # imports vLLM: deferred to the run

    layers = {layer for shapes in adapters for layer, _ in shapes}
    total = 0
    for layer in layers:
        for modules in STACKED_PROJECTIONS.values():
            rank = max(sum(shapes[(layer, m)][0][0] for m in modules if (layer, m) in shapes) for shapes in adapters)
            if rank == 0:
                continue
            weights = [base[f"model.layers.{layer}.{ADAPTER_MODULES[m]}.weight"]["shape"] for m in modules]
            total += len(adapters) * rank * (weights[0][1] + sum(shape[0] for shape in weights))
    return total


@dataclass(frozen=True)
class BenchFolders:
    base: Path
    adapters: list[Path]
    merged: list[Path]  # adapter k merged into the base: a full expert
    lora_composite: Path
    merged_composite: Path


def weight_accounting(folders: BenchFolders, element_bytes: int) -> dict[str, dict]:
    """Per system: bytes on disk, held by the engine and read per decode step (estimate).

    ``element_bytes``: the engine's bytes per parameter. Disk bytes are the files' own.
    """
    expert = folder_tensors(folders.merged[0])
    base = folder_tensors(folders.lora_composite)  # the base's own files, once, at the top
    adapters = [folder_tensors(adapter_dir(folders.lora_composite, k)) for k in range(len(folders.adapters))]
    shapes = [read_adapter(adapter_dir(folders.lora_composite, k), "adapter").factor_shapes()
              for k in range(len(folders.adapters))]
    factors_engine = stacked_factor_parameters(base, shapes) * element_bytes
    merged = folder_tensors(folders.merged_composite)
    return {
        "one expert": _system_bytes(expert, element_bytes),
        "LoRA composite": {
            "disk_bytes": parameter_bytes(base) + sum(parameter_bytes(a) for a in adapters),
            "engine_bytes": parameter_bytes(base, element_bytes) + factors_engine,
            "read_per_step_bytes": parameter_bytes(decode_read_tensors(base), element_bytes) + factors_engine,
            "factor_disk_bytes": sum(parameter_bytes(a) for a in adapters),
            "factor_engine_bytes": factors_engine,
        },
        "merged composite": _system_bytes(merged, element_bytes),
    }


def _system_bytes(tensors: dict[str, dict], element_bytes: int) -> dict[str, int]:
    return {"disk_bytes": parameter_bytes(tensors), "engine_bytes": parameter_bytes(tensors, element_bytes),
            "read_per_step_bytes": parameter_bytes(decode_read_tensors(tensors), element_bytes)}


# ---- the models, written once ----

def write_merged_expert(base_dir: str | Path, adapter: str | Path, out_dir: str | Path) -> Path:
    """The adapter merged into its base by ``peft`` (``merge_and_unload``), saved as a full model with
    the base's tokenizer: the expert a user would serve without LoRA support."""
    # peft and transformers cost seconds: imported when models are written
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with atomic_folder(out_dir) as staging:
        model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
        merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
        merged.save_pretrained(staging)
        copy_tokenizer(Path(base_dir), staging)
    return Path(out_dir)


def prepare_folders(config: LoRABenchConfig) -> BenchFolders:
    """The base, adapters and merged experts (written when missing), and both composites (packed anew)."""
    from gatemix.engine.lora_pack import pack_lora_composite  # packing imports vLLM's registry
    from gatemix.engine.pack import pack_composite

    base = cached_random_experts(Path(config.cache_dir).resolve(), 1, config.architecture, config.shape(),
                                 seed=config.seed)[0]
    # The adapters' base path is absolute: packing checks the base by the folder their config names.
    spec = {"rank": config.rank, "alpha": config.alpha, "targets": config.targets, "seed": config.seed}
    root = base.parent / f"lora-{spec_key(spec)}"
    adapters, merged = [], []
    for index in range(config.adapters):
        adapter, expert = root / f"adapter-{index}", root / f"merged-{index}"
        if not (adapter / ADAPTER_WEIGHTS).is_file():
            logger.info("writing random LoRA adapter %s", adapter)
            with atomic_folder(adapter) as staging:
                write_random_lora_adapter(staging, base, TARGETS[config.targets], rank=config.rank,
                                          alpha=config.alpha, seed=config.seed + index)
        if not expert.is_dir():
            logger.info("merging %s into a full expert %s", adapter.name, expert)
            write_merged_expert(base, adapter, expert)
        adapters.append(adapter)
        merged.append(expert)
    names = [f"expert-{index}" for index in range(config.adapters)]
    folders = BenchFolders(base, adapters, merged, root / f"lora-composite-k{config.adapters}",
                           root / f"merged-composite-k{config.adapters}")
    pack_lora_composite(base, adapters, folders.lora_composite, gate="uniform", names=names, overwrite=True)
    pack_composite(merged, folders.merged_composite, gate="uniform", names=names, overwrite=True)
    return folders


# ---- the measurement ----

def _engine_pids(llm) -> list[int]:
    """The engine core processes of an offline ``LLM`` (weights and KV cache live there, not in
    this process); this process when vLLM runs the engine in it."""
    manager = getattr(llm.llm_engine.engine_core, "resources", None)
    processes = getattr(getattr(manager, "engine_manager", None), "processes", None) or []
    return [process.pid for process in processes] or [os.getpid()]


def measure_side_by_side(composites: dict[str, Path], config: LoRABenchConfig, vocab_size: int) -> dict:
    """Both engines alive; per concurrency, ``repeats`` rounds timing each once on the same prompts,
    the order alternating by round. Best tokens/s per system, the per-round ratios of the first
    system to the second and their median, and each engine's peak resident MiB over the rounds."""
    # vllm: deferred, `gatemix bench --help` imports this module; servers: psutil, a serve-bench extra
    from vllm import LLM, SamplingParams

    from gatemix.bench.servers import ProcessUsage

    settings = EngineSettings(dtype=config.dtype, max_model_len=config.max_model_len,
                              max_num_seqs=max(config.concurrency), kv_cache_gib=config.kv_cache_gib)
    params = SamplingParams(max_tokens=config.output_len, temperature=0.0, ignore_eos=True)
    warm_up = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    names = list(composites)
    with ExitStack() as stack:
        engines = {name: stack.enter_context(stopping(LLM(**engine_kwargs(folder, settings), disable_log_stats=True)))
                   for name, folder in composites.items()}
        usages = {name: stack.enter_context(ProcessUsage(_engine_pids(llm), interval_s=0.25))
                  for name, llm in engines.items()}
        for llm in engines.values():
            llm.generate(random_requests(vocab_size, max(config.concurrency), config.prompt_len), warm_up, use_tqdm=False)
        best, rounds = {name: {} for name in names}, {}
        for concurrency in config.concurrency:
            requests = random_requests(vocab_size, concurrency, config.prompt_len)
            timed = []
            for index in range(config.repeats):
                order = names if index % 2 == 0 else names[::-1]
                timed.append({name: timed_tps(engines[name], requests, params) for name in order})
            for name in names:
                best[name][concurrency] = max(t[name] for t in timed)
            rounds[concurrency] = [t[names[0]] / t[names[1]] for t in timed]
    # The usages were entered last, so they stopped (with a last sample) before the engines did.
    return {"tokens_per_second": best, "rounds": rounds,
            "ratio": {c: statistics.median(r) for c, r in rounds.items()},
            "peak_memory_mib": {name: usage.peak_mib for name, usage in usages.items()},
            # CPU seconds of each engine's processes over the whole run: an idle engine that spins shows here.
            "engine_cpu_s": {name: usage.api_cpu_s + usage.engine_cpu_s for name, usage in usages.items()}}


def run_lora_bench(config: LoRABenchConfig) -> dict:
    """Write or reuse the models, count their weights, measure both composites side by side."""
    folders = prepare_folders(config)
    weights = weight_accounting(folders, ELEMENT_BYTES[config.dtype])
    composites = {"LoRA composite": folders.lora_composite, "merged composite": folders.merged_composite}
    measured = measure_side_by_side(composites, config, config.vocab_size)
    return {
        "config": asdict(config),
        "folders": {name: str(path) for name, path in composites.items()} | {"base": str(folders.base)},
        "weights": weights,
        **measured,
        "ratios": lora_ratios(weights, measured["ratio"]),
    }


def lora_ratios(weights: dict[str, dict], tps_ratio: dict[int, float]) -> dict:
    """The figures the issue sets targets on, from the byte counts and the paired rounds."""
    expert, lora, merged = (weights[name] for name in ("one expert", *SYSTEMS))
    return {
        "lora_disk_over_expert": lora["disk_bytes"] / expert["disk_bytes"],
        "lora_engine_over_expert": lora["engine_bytes"] / expert["engine_bytes"],
        "merged_disk_over_expert": merged["disk_bytes"] / expert["disk_bytes"],
        "read_per_step_lora_over_merged": lora["read_per_step_bytes"] / merged["read_per_step_bytes"],
        "tps_lora_over_merged": dict(tps_ratio),
    }


# ---- the report ----

def _mib(count: float) -> str:
    return f"{count / 2**20:.1f}"


def _met(value: float, ok: bool) -> str:
    return f"{value:.2f}x ({'met' if ok else 'not met'})"


def format_lora_bench(result: dict) -> str:
    """A markdown table of both systems, then the one-expert figures and the targets."""
    config, weights, ratios = result["config"], result["weights"], result["ratios"]
    expert = weights["one expert"]
    lines = [
        (f"K = {config['adapters']} random LoRA adapters (rank {config['rank']}, {config['targets']}, "
         f"alpha {config['alpha']:g}) of a random {config['architecture']} base (hidden {config['hidden_size']}, "
         f"{config['layers']} layers, MLP {config['intermediate_size']}, vocabulary {config['vocab_size']}) "
         f"vs the same adapters merged into {config['adapters']} full experts; dtype {config['dtype']}, "
         f"prompt {config['prompt_len']} + output {config['output_len']} tokens, {config['repeats']} paired rounds"),
        "",
        "| | LoRA composite | merged composite | LoRA / merged |",
        "|---|---|---|---|",
    ]
    rows = {"weights on disk (MiB)": "disk_bytes", "weights in the engine (MiB)": "engine_bytes",
            "weights read per decode step (MiB, estimate)": "read_per_step_bytes"}
    for label, key in rows.items():
        lora, merged = (weights[name][key] for name in SYSTEMS)
        lines.append(f"| {label} | {_mib(lora)} ({lora / expert[key]:.2f}x one expert) | "
                     f"{_mib(merged)} ({merged / expert[key]:.2f}x) | {lora / merged:.2f} |")
    peak = [result["peak_memory_mib"][name] for name in SYSTEMS]
    lines.append(f"| peak resident memory of the engine, its {config['kv_cache_gib']} GiB KV cache included (MiB) | "
                 f"{peak[0]:.0f} | {peak[1]:.0f} | "
                 f"{peak[0] / peak[1]:.2f} |")
    for concurrency, by_round in result["rounds"].items():
        tps = [result["tokens_per_second"][name][concurrency] for name in SYSTEMS]
        rounds = ", ".join(f"{r:.2f}" for r in by_round)
        lines.append(f"| decode tokens/s, c={concurrency} (best round) | {tps[0]:.1f} | {tps[1]:.1f} | "
                     f"{result['ratio'][concurrency]:.2f} (median of rounds {rounds}) |")
    lines += [
        "",
        (f"one expert: {_mib(expert['disk_bytes'])} MiB on disk, {_mib(expert['read_per_step_bytes'])} MiB "
         "read per decode step (its input embedding table is read a row per token, not counted); "
         f"the LoRA factors: {_mib(weights['LoRA composite']['factor_disk_bytes'])} MiB on disk, "
         f"{_mib(weights['LoRA composite']['factor_engine_bytes'])} MiB stacked and rank-padded in the engine"),
        (f"targets: LoRA composite's weights <= {WEIGHT_TARGET}x one expert's: on disk "
         f"{_met(ratios['lora_disk_over_expert'], ratios['lora_disk_over_expert'] <= WEIGHT_TARGET)}, in the "
         f"engine {_met(ratios['lora_engine_over_expert'], ratios['lora_engine_over_expert'] <= WEIGHT_TARGET)} "
         f"(merged: {ratios['merged_disk_over_expert']:.2f}x); decode tokens/s LoRA >= merged: "
         + ", ".join(f"c={c} {_met(r, r >= 1.0)}" for c, r in ratios["tps_lora_over_merged"].items())),
    ]
    return "\n".join(lines)
