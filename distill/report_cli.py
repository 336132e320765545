"""``gatemix distill-report``: the student beside the ensemble, the baselines and the experts."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from gatemix.config_cli import add_config_flags, config_from_args
from gatemix.defaults import DEFAULT_PROJECT_DIR


@dataclass
class DistillReportConfig:
    project: str = field(default="", metadata={
        "help": "the project file (or its folder): experts, [baselines], eval text"})
    student: str = field(default="", metadata={
        "help": "the student folder; empty: the project's student/"})
    composite_dir: str = field(default="", metadata={
        "help": "the ensemble; empty: the project's composite, packed with its served gate"})
    compare: list[str] = field(default_factory=list, metadata={
        "help": "more models to score, name=folder (e.g. no-teacher=<the same-size model "
                "trained on the same tokens with --loss cross_entropy>)"})
    out_dir: str = field(default="", metadata={
        "help": "where report.md and its PNGs go; empty: <student>.report"})
    seq_len: int = field(default=0, metadata={
        "help": "tokens per eval window (0: the student's training seq_len)"})
    eval_tokens: int = field(default=8192, metadata={"help": "eval-split tokens per domain"})
    batch_size: int = field(default=16, metadata={"help": "windows per forward"})
    prompts_per_domain: int = field(default=4, metadata={
        "help": "eval prompts per domain in the generation check"})
    prompt_tokens: int = field(default=16, metadata={"help": "tokens of each prompt"})
    new_tokens: int = field(default=32, metadata={"help": "greedy tokens generated per prompt"})
    draft_tokens: int = field(default=3, metadata={
        "help": "N, the tokens the student would draft per speculative step, for its mean "
                "acceptance length as the ensemble's draft"})
    target: float = field(default=0.05, metadata={
        "help": "the student's cross-entropy target: at most this much above the ensemble's, "
                "relative, on every domain"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda[:N]"})
    threads: int = field(default=2, metadata={"help": "torch CPU threads"})

    def __post_init__(self) -> None:
        if not self.project:
            raise ValueError("distill-report needs a project: --project <gatemix.toml or folder>")
        if self.seq_len and self.seq_len < 8:
            raise ValueError("seq_len must be 0 or >= 8")
        if min(self.eval_tokens, self.batch_size, self.prompts_per_domain, self.prompt_tokens,
               self.new_tokens, self.draft_tokens, self.threads) < 1:
            raise ValueError("eval_tokens, batch_size, prompts_per_domain, prompt_tokens, "
                             "new_tokens, draft_tokens and threads must be >= 1")
        if self.seq_len and self.draft_tokens >= self.seq_len:
            raise ValueError("draft_tokens must be < seq_len")
        if self.seq_len and self.eval_tokens < self.seq_len:
            raise ValueError("eval_tokens must be >= seq_len")
        if self.seq_len and self.prompt_tokens >= self.seq_len:
            raise ValueError("prompt_tokens must be < seq_len")
        if self.target < 0:
            raise ValueError("target must be >= 0")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "distill-report",
        help="report on a distilled student: per-domain loss against the ensemble, baselines, "
             "experts; the Dirichlet curve; the student as a speculative draft; a generation "
             "check; the training curve",
        description="Score the student, the ensemble (its served gate), every expert, the "
        "project's baselines and any --compare model on the same eval windows, and write "
        "report.md with PNGs.",
    )
    add_config_flags(parser, DistillReportConfig, defaults={"project": DEFAULT_PROJECT_DIR})
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from gatemix.distill.report import build_report  # torch: deferred so `--help` stays fast

    config = config_from_args(args, DistillReportConfig, project=DEFAULT_PROJECT_DIR)
    print(f"report written to {build_report(config)}")
    return 0
