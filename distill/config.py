"""Configuration of ``gatemix distill``: the ensemble into one student model.

One dataclass, one ``--flag`` per field (``gatemix.config_cli``), range checks
in ``__post_init__``, as TRL's ``GKDConfig``. ``RUNTIME_FIELDS`` change where
and how fast a run goes, never what it computes, so a checkpoint written under
other values of them still resumes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from gatemix.config_cli import field_help

INITS = ("expert", "model", "config")
LOSSES = ("forward_kl", "jsd", "reverse_kl", "tv", "cross_entropy")
DOMAIN_WEIGHTS = ("uniform", "lambda", "proportional")
KEEP = ("best", "last")

# Fields a resumed run may change: they decide where files go, the speed and what is shown.
RUNTIME_FIELDS = (
    "out_dir", "run_dir", "cache_dir", "teacher_cache", "checkpoint_every", "resume",
    "threads", "device", "progress", "eval_every", "eval_tokens", "eval_batch_size", "keep",
)


@dataclass
class DistillConfig:
    # --- what to read and where to write ---
    project: str = field(default="", **field_help(
        "the project file (or its folder): experts, baselines and each domain's train/eval text"))
    composite_dir: str = field(default="", **field_help(
        "the teacher composite; empty: the project's, packed with its served gate"))
    out_dir: str = field(default="", **field_help(
        "the student folder, a plain Hugging Face folder; empty: <project work_dir>/student"))
    run_dir: str = field(default="", **field_help(
        "checkpoints and the best step's student; empty: <out_dir>.run"))
    cache_dir: str = field(default="", **field_help(
        "the teacher cache; empty: <project work_dir>/cache/distill-teacher"))
    # --- the student ---
    init: str = field(default="expert", **field_help(
        "student initial weights: expert (an expert's; LoRA experts' base), model (a folder or a project "
        "baseline, e.g. the shared base), config (fresh weights from a config)", choices=INITS))
    init_from: str = field(default="", **field_help(
        "expert: its name (empty: the first); model: a [baselines] name or a folder; "
        "config: a folder with config.json (empty: the first expert's)"))
    student_config: str = field(default="", **field_help(
        "with --init config: overrides of the config, 'key=value,...' "
        "(e.g. num_hidden_layers=1,intermediate_size=128)"))
    # --- the optimization ---
    steps: int = field(default=400, **field_help("optimizer steps"))
    batch_size: int = field(default=8, **field_help(
        "sequences per step, over all processes (a multiple of the process count)"))
    seq_len: int = field(default=128, **field_help("tokens per sequence"))
    lr: float = field(default=2e-3, **field_help("AdamW peak learning rate"))
    warmup_steps: int = field(default=10, **field_help("linear warmup steps"))
    min_lr_ratio: float = field(default=0.1, **field_help(
        "the cosine decay ends at this fraction of the peak learning rate"))
    weight_decay: float = field(default=0.0, **field_help("AdamW weight decay"))
    grad_clip: float = field(default=1.0, **field_help("gradient norm clip; 0 disables it"))
    seed: int = field(default=0, **field_help(
        "seed of the batches, the on-policy samples and a fresh student's weights"))
    # --- the objective ---
    loss: str = field(default="forward_kl", **field_help(
        "forward_kl KL(teacher||student), jsd (generalized JSD with --beta), reverse_kl "
        "KL(student||teacher), tv (total variation 0.5*sum|p-q|: 1 - TV is the student's "
        "acceptance rate as a speculative-decoding draft), or cross_entropy (no teacher: the same tokens' labels, "
        "the no-teacher baseline)", choices=LOSSES))
    beta: float = field(default=0.5, **field_help(
        "generalized JSD's mixture weight, in (0, 1) (0 would be forward KL, 1 reverse KL)"))
    label_weight: float = field(default=1.0, **field_help(
        "weight of the cross-entropy on the data's own next tokens, added to the distillation "
        "loss (Hinton's hard-label term; on-policy rows have none); 0: pure distillation"))
    teacher_top_k: int = field(default=256, **field_help(
        "keep the teacher's top-k tokens and one tail bucket with the rest of the mass (the "
        "cache holds k*8+4 bytes per token); 0 or >= the vocabulary: the exact full "
        "distribution (V*4 bytes per token)"))
    domain_weights: str = field(default="uniform", **field_help(
        "how often each domain is sampled: uniform, lambda (the gate fit's final lambda from "
        "the served router's details: the robust weighting, the worst mixture for the gate), "
        "proportional (the train data's token shares)", choices=DOMAIN_WEIGHTS))
    uniform_mix: float = field(default=0.0, **field_help(
        "share of uniform mixed into lambda or proportional weights, so that no domain is "
        "starved (a fitted lambda can put ~0 on a domain)"))
    on_policy_fraction: float = field(default=0.0, **field_help(
        "share of each batch sampled from the student (GKD) and scored by the teacher"))
    on_policy_prompt_tokens: int = field(default=16, **field_help(
        "data tokens the student continues in an on-policy sequence"))
    on_policy_temperature: float = field(default=1.0, **field_help(
        "the student's sampling temperature for on-policy sequences"))
    # --- evaluation, checkpoints, runtime ---
    eval_every: int = field(default=50, **field_help(
        "held-out KL and cross-entropy every N steps (and at 0 and the end); 0: never"))
    eval_tokens: int = field(default=8192, **field_help(
        "eval-split tokens per domain in the held-out figures"))
    eval_batch_size: int = field(default=16, **field_help("sequences per held-out batch"))
    keep: str = field(default="best", **field_help(
        "what out_dir receives: the best held-out step's student or the last", choices=KEEP))
    checkpoint_every: int = field(default=50, **field_help(
        "a checkpoint every N steps (and at the end); 0: none"))
    resume: bool = field(default=True, **field_help(
        "continue from the run folder's last checkpoint when there is one"))
    teacher_cache: bool = field(default=True, **field_help(
        "keep the teacher's targets on disk, so a rerun or a second student reads them"))
    threads: int = field(default=2, **field_help("torch CPU threads"))
    device: str = field(default="auto", **field_help(
        "where teacher and student run: auto (cuda if there is one; under torchrun each "
        "process its own GPU), cpu, cuda[:N]"))
    teacher_dtype: str = field(default="auto", **field_help(
        "the teacher experts' dtype: auto (bf16 on GPU, fp32 on CPU), float32, bfloat16"))
    progress: bool = field(default=True, **field_help("show progress bars"))

    def __post_init__(self) -> None:
        if not self.project:
            raise ValueError("distill needs a project: --project <gatemix.toml or its folder>")
        if self.steps < 1 or self.batch_size < 1 or self.seq_len < 8:
            raise ValueError("steps >= 1, batch_size >= 1 and seq_len >= 8 required")
        if self.loss == "jsd" and not 0.0 < self.beta < 1.0:
            raise ValueError("--loss jsd needs beta in (0, 1); use forward_kl or reverse_kl "
                             "for the ends")
        if self.lr <= 0 or not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError("lr must be positive and min_lr_ratio in [0, 1]")
        if min(self.warmup_steps, self.teacher_top_k, self.eval_every, self.checkpoint_every) < 0:
            raise ValueError("warmup_steps, teacher_top_k, eval_every and checkpoint_every "
                             "must be >= 0")
        if self.weight_decay < 0 or self.grad_clip < 0 or self.label_weight < 0:
            raise ValueError("weight_decay, grad_clip and label_weight must be >= 0")
        if not 0.0 <= self.on_policy_fraction <= 1.0 or not 0.0 <= self.uniform_mix <= 1.0:
            raise ValueError("on_policy_fraction and uniform_mix must lie in [0, 1]")
        if self.on_policy_fraction > 0 and self.loss == "cross_entropy":
            raise ValueError("on-policy sequences need a teacher; --loss cross_entropy has none")
        if not 1 <= self.on_policy_prompt_tokens < self.seq_len:
            raise ValueError("on_policy_prompt_tokens must lie in [1, seq_len)")
        if self.on_policy_temperature < 0:
            raise ValueError("on_policy_temperature must be >= 0 (0: greedy)")
        if self.eval_tokens < self.seq_len or self.eval_batch_size < 1 or self.threads < 1:
            raise ValueError("eval_tokens >= seq_len, eval_batch_size >= 1 and threads >= 1 "
                             "required")
        if self.student_config and self.init != "config":
            raise ValueError("--student-config applies to --init config only")
        for name, choices in (("init", INITS), ("loss", LOSSES),
                              ("domain_weights", DOMAIN_WEIGHTS), ("keep", KEEP)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)}")

    @property
    def uses_teacher(self) -> bool:
        return self.loss != "cross_entropy"

    def result_settings(self) -> dict:
        """The fields that decide the trained weights: a checkpoint must agree on all of them."""
        return {key: value for key, value in asdict(self).items() if key not in RUNTIME_FIELDS}
