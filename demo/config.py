"""The one config of the build-demo job, and its two presets.

Every field names the build stage it feeds through ``metadata["stage"]``. A
stage's reuse key hashes only its own fields (plus the build ids of the stages
it reads), so changing, say, ``expert_steps`` rebuilds the experts and what
depends on them, and keeps the corpus, the tokenizer and the base model.
Fields of stage ``"runtime"`` (where to write, threads, progress bars) change
no result and are never hashed.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from gatemix.demo.errors import DemoBuildError

KNOWN_DOMAINS = ("code", "legal", "docs")
BASELINE_NAMES = ("monolithic", "monolithic_compute")  # demo/baselines.py
STAGES = ("corpus", "tokenizer", "model", "training", "base", "experts", "monolithic", "eval",
          "ood", "gate")
# 256 byte symbols and the special tokens leave no room for merges below this.
MIN_VOCAB_SIZE = 300
# Head sizes every vLLM attention backend we run on accepts (the CPU backend's
# smallest is 32), so each model keeps hidden_size / num_heads in this set.
SUPPORTED_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256)


@dataclass
class DemoConfig:
    """What to collect, how to split it, and how big and how long to train each model."""

    out_dir: str = field(
        metadata={"help": "Folder the demo is built in; stages already there are reused.",
                  "stage": "runtime"})
    # --- corpus ---
    domains: tuple[str, ...] = field(
        default=KNOWN_DOMAINS,
        metadata={"help": f"Domains to collect, in expert order; a subset of {KNOWN_DOMAINS}.",
                  "stage": "corpus"})
    seed: int = field(
        default=0,
        metadata={"help": "Seed of the document sampling, the split and every training run.",
                  "stage": "corpus"})
    gate_fraction: float = field(
        default=0.1,
        metadata={"help": "Share of each domain's documents held out to fit the gate.",
                  "stage": "corpus"})
    eval_fraction: float = field(
        default=0.1,
        metadata={"help": "Share of each domain's documents held out for evaluation.",
                  "stage": "corpus"})
    max_docs_per_domain: int = field(
        default=800,
        metadata={"help": "Most documents kept per domain (a seeded sample of what exists).",
                  "stage": "corpus"})
    max_chars_per_doc: int = field(
        default=8000,
        metadata={"help": "Documents are cut at the last line break before this many chars.",
                  "stage": "corpus"})
    min_chars_per_doc: int = field(
        default=200,
        metadata={"help": "Shorter documents (stubs, redirects) are skipped.", "stage": "corpus"})
    stdlib_dir: str = field(
        default="",
        metadata={"help": "Python stdlib sources for 'code'; empty: sysconfig's stdlib path.",
                  "stage": "corpus"})
    licenses_dir: str = field(
        default="/usr/share/common-licenses",
        metadata={"help": "License texts for 'legal' (every file in it).", "stage": "corpus"})
    package_docs_dir: str = field(
        default="/usr/share/doc",
        metadata={"help": "Package docs; each <pkg>/copyright goes to 'legal'.",
                  "stage": "corpus"})
    man_dir: str = field(
        default="/usr/share/man",
        metadata={"help": "Man pages (man1..man9, gzip'd) added to 'docs' after the pydoc "
                          "topics; empty or missing: pydoc topics only.", "stage": "corpus"})
    # --- tokenizer ---
    vocab_size: int = field(
        default=4096,
        metadata={"help": "Target size of the shared byte-level BPE vocabulary.",
                  "stage": "tokenizer"})
    context_length: int = field(
        default=1024,
        metadata={"help": "max_position_embeddings of every model and the tokenizer's "
                          "model_max_length.", "stage": "tokenizer"})
    # --- base and expert architecture ---
    hidden_size: int = field(
        default=128, metadata={"help": "Hidden size of the base and the experts.",
                               "stage": "model"})
    num_layers: int = field(
        default=4, metadata={"help": "Decoder layers of the base and the experts.",
                             "stage": "model"})
    num_heads: int = field(
        default=4, metadata={"help": "Attention heads of the base and the experts.",
                             "stage": "model"})
    num_kv_heads: int = field(
        default=2, metadata={"help": "Key/value heads (GQA) of the base and the experts.",
                             "stage": "model"})
    intermediate_size: int = field(
        default=384, metadata={"help": "MLP width of the base and the experts.",
                               "stage": "model"})
    # --- training, shared by every run ---
    seq_len: int = field(
        default=256, metadata={"help": "Tokens per packed training and eval window.",
                               "stage": "training"})
    batch_size: int = field(
        default=8, metadata={"help": "Windows per optimizer step.", "stage": "training"})
    warmup_steps: int = field(
        default=20, metadata={"help": "Linear warmup steps of each run.", "stage": "training"})
    min_lr_ratio: float = field(
        default=0.1, metadata={"help": "Cosine decay ends at this fraction of the peak lr.",
                               "stage": "training"})
    weight_decay: float = field(
        default=0.01, metadata={"help": "AdamW weight decay.", "stage": "training"})
    grad_clip: float = field(
        default=1.0, metadata={"help": "Gradient norm clip; 0 disables it.", "stage": "training"})
    # --- base ---
    base_steps: int = field(
        default=320, metadata={"help": "Optimizer steps of the base on the pooled train split.",
                               "stage": "base"})
    base_learning_rate: float = field(
        default=3e-3, metadata={"help": "Peak learning rate of the base.", "stage": "base"})
    # --- experts ---
    expert_steps: int = field(
        default=160, metadata={"help": "Optimizer steps of each expert on its own domain.",
                               "stage": "experts"})
    expert_learning_rate: float = field(
        default=2e-3, metadata={"help": "Peak learning rate of the experts.",
                                "stage": "experts"})
    # --- monolithic baselines (built only with with_baselines) ---
    with_baselines: bool = field(
        default=False,
        metadata={"help": "Also train the two monolithic baselines, a parameter-matched and a "
                          "compute-matched one, for the gate report and the benchmarks (serving "
                          "needs neither; they are kept and reused once built).",
                  "stage": "runtime"})
    baselines: tuple[str, ...] = field(
        default=("monolithic", "monolithic_compute"),
        metadata={"help": "Which baselines with_baselines builds: monolithic (parameter-matched), "
                          "monolithic_compute (compute-matched).", "stage": "runtime"})
    mono_hidden_size: int = field(
        default=256, metadata={"help": "Hidden size of the monolithic model.",
                               "stage": "monolithic"})
    mono_num_layers: int = field(
        default=4, metadata={"help": "Decoder layers of the monolithic model.",
                             "stage": "monolithic"})
    mono_num_heads: int = field(
        default=8, metadata={"help": "Attention heads of the monolithic model.",
                             "stage": "monolithic"})
    mono_num_kv_heads: int = field(
        default=4, metadata={"help": "Key/value heads of the monolithic model.",
                             "stage": "monolithic"})
    mono_intermediate_size: int = field(
        default=768, metadata={"help": "MLP width of the monolithic model.",
                               "stage": "monolithic"})
    mono_steps: int = field(
        default=0,
        metadata={"help": "Steps of the monolithic model; 0: base_steps + K * expert_steps, "
                          "the tokens base and experts saw together.", "stage": "monolithic"})
    mono_learning_rate: float = field(
        default=2e-3, metadata={"help": "Peak learning rate of the monolithic model.",
                                "stage": "monolithic"})
    # --- out-of-domain text (no expert trains on it) ---
    ood_docs_dir: str = field(
        default="/usr/share/doc",
        metadata={"help": "Package docs whose changelogs (no domain collects them) are the "
                          "out-of-domain text of the report; missing or empty: none.",
                  "stage": "ood"})
    ood_max_docs: int = field(
        default=120, metadata={"help": "Most out-of-domain documents kept (0: none).",
                               "stage": "ood"})
    # --- the robust gate (what make serve serves) ---
    fit_gate: bool = field(
        default=True,
        metadata={"help": "Fit the robust gate as the build's last stage (into <out>/gate, what "
                          "`gatemix serve` serves); off: the demo serves the uniform gate.",
                  "stage": "gate"})
    gate_steps: int = field(
        default=600, metadata={"help": "Primal-dual steps of each game of the gate fit.",
                               "stage": "gate"})
    gate_two_stage: bool = field(
        default=False,
        metadata={"help": "Also fit the paper's two-stage route (a sequence gate distilled into "
                          "a router; minutes on 2 cores), a candidate and a report row.",
                  "stage": "gate"})
    gate_max_sequences: int = field(
        default=0, metadata={"help": "Cap on the gate fit's sequences per domain and split "
                                     "(0: all).", "stage": "gate"})
    # --- eval ---
    eval_max_tokens: int = field(
        default=65536,
        metadata={"help": "Eval-split tokens scored per domain for the eval-loss table.",
                  "stage": "eval"})
    # --- runtime ---
    num_threads: int = field(
        default=2, metadata={"help": "torch.set_num_threads for the build.", "stage": "runtime"})
    progress: bool = field(
        default=True, metadata={"help": "Show tqdm progress bars.", "stage": "runtime"})

    def __post_init__(self) -> None:
        self.out_dir = str(self.out_dir)
        self.domains = tuple(self.domains)
        _check(bool(self.domains) and len(set(self.domains)) == len(self.domains),
               f"domains must be distinct and non-empty, got {self.domains}")
        self.baselines = tuple(self.baselines)
        _check(set(self.baselines) <= set(BASELINE_NAMES),
               f"baselines must be among {BASELINE_NAMES}, got {self.baselines}")
        unknown = [d for d in self.domains if d not in KNOWN_DOMAINS]
        _check(not unknown, f"unknown domains {unknown}; known: {KNOWN_DOMAINS}")
        _check(0 < self.gate_fraction < 0.5 and 0 < self.eval_fraction < 0.5
               and self.gate_fraction + self.eval_fraction < 0.9,
               "gate_fraction and eval_fraction must be in (0, 0.5) and leave train > 10%")
        _check(self.max_docs_per_domain >= 3, "max_docs_per_domain must be >= 3")
        _check(0 < self.min_chars_per_doc < self.max_chars_per_doc,
               "need 0 < min_chars_per_doc < max_chars_per_doc")
        _check(self.vocab_size >= MIN_VOCAB_SIZE, f"vocab_size must be >= {MIN_VOCAB_SIZE}")
        _check(2 <= self.seq_len <= self.context_length,
               "seq_len must be in [2, context_length]")
        self._check_architecture("", self.hidden_size, self.num_layers, self.num_heads,
                                 self.num_kv_heads, self.intermediate_size)
        self._check_architecture("mono_", self.mono_hidden_size, self.mono_num_layers,
                                 self.mono_num_heads, self.mono_num_kv_heads,
                                 self.mono_intermediate_size)
        for name in ("batch_size", "base_steps", "expert_steps", "eval_max_tokens",
                     "num_threads", "gate_steps"):
            _check(getattr(self, name) >= 1, f"{name} must be >= 1")
        _check(min(self.warmup_steps, self.mono_steps, self.ood_max_docs,
                   self.gate_max_sequences) >= 0,
               "warmup_steps, mono_steps, ood_max_docs and gate_max_sequences must be >= 0")
        _check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio must be in [0, 1]")
        _check(self.weight_decay >= 0 and self.grad_clip >= 0,
               "weight_decay and grad_clip must be >= 0")
        for name in ("base_learning_rate", "expert_learning_rate", "mono_learning_rate"):
            _check(0 < getattr(self, name) < 1, f"{name} must be in (0, 1)")

    @staticmethod
    def _check_architecture(prefix: str, hidden: int, layers: int, heads: int, kv_heads: int,
                            intermediate: int) -> None:
        _check(min(hidden, layers, heads, kv_heads, intermediate) >= 1,
               f"{prefix}model sizes must be >= 1")
        _check(hidden % heads == 0 and hidden // heads in SUPPORTED_HEAD_DIMS,
               f"{prefix}hidden_size / {prefix}num_heads must be one of {SUPPORTED_HEAD_DIMS} "
               f"(vLLM head sizes), got {hidden}/{heads}")
        _check(heads % kv_heads == 0, f"{prefix}num_heads must be a multiple of num_kv_heads")

    @property
    def monolithic_steps(self) -> int:
        """Steps that give the monolithic model the tokens base and experts saw together."""
        return self.mono_steps or self.base_steps + len(self.domains) * self.expert_steps

    @property
    def compute_matched_steps(self) -> int:
        """Steps of the compute-matched baseline after the base: the K experts' steps together."""
        return len(self.domains) * self.expert_steps

    def stage_settings(self, *stages: str) -> dict[str, Any]:
        """The fields that feed the given stages, for hashing into a reuse key."""
        unknown = set(stages) - set(STAGES)
        if unknown:
            raise ValueError(f"unknown stages {sorted(unknown)}")
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.metadata["stage"] in stages}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def preset(cls, name: str, out_dir: str | os.PathLike[str], **overrides: Any) -> DemoConfig:
        """``"full"`` (about 10 minutes on 2 cores) or ``"test"`` (about 2), then overrides."""
        if name not in PRESETS:
            raise DemoBuildError(f"unknown demo preset {name!r}; known: {sorted(PRESETS)}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise DemoBuildError(f"unknown demo config fields {unknown}")
        return cls(out_dir=out_dir, **{**PRESETS[name], **overrides})


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise DemoBuildError(f"bad demo config: {message}")


# The dataclass defaults are the full preset. The test preset keeps the experts'
# head size at 32 (2 heads of 32) so vLLM's CPU attention accepts it. Its gate fit
# has the full preset's steps (the posterior's forgetting factor needs them to
# move) on the test demo's few, small features: about a minute on 2 cores.
PRESETS: dict[str, dict[str, Any]] = {
    "full": {},
    "test": {
        "max_docs_per_domain": 240,
        "max_chars_per_doc": 4000,
        "vocab_size": 2048,
        "context_length": 512,
        "hidden_size": 64,
        "num_layers": 2,
        "num_heads": 2,
        "num_kv_heads": 1,
        "intermediate_size": 192,
        "seq_len": 128,
        "batch_size": 16,
        "warmup_steps": 10,
        "base_steps": 300,
        "expert_steps": 150,
        "mono_hidden_size": 128,
        "mono_num_layers": 3,
        "mono_num_heads": 4,
        "mono_num_kv_heads": 2,
        "mono_intermediate_size": 256,
        "eval_max_tokens": 16384,
        "ood_max_docs": 40,
    },
}
