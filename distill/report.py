"""``gatemix distill-report``: how good the student is, beside the ensemble it was distilled from.

Every model is scored on the same eval windows (``data.eval_windows``):

- the student; the ensemble (the served gate, through ``EnsembleTeacher``);
  every expert alone (the best single expert named); the project's
  ``[baselines]`` (the monolithic model); any ``--compare`` model, such as
  the same-size model trained on the same tokens without a teacher;
- per domain: the cross-entropy and the excess over the in-domain expert, the
  worst domain and the Dirichlet curve, computed and written by the gate
  report's own pieces (``gate.evaluate``);
- the student against the ensemble per domain, against the target ratio, and
  where a target is missed, by how much and what the figures say about why;
- the student as the ensemble's speculative-decoding draft, per domain: 1 - TV,
  greedy agreement and the mean acceptance length at ``--draft-tokens`` N
  (``distill/acceptance.py``), from the same pass over the eval windows that
  scores the ensemble and the student;
- a generation check: the student's and the ensemble's greedy continuations
  of eval prompts, each scored by the ensemble (its NLL per token);
- the training curve from the student's ``distill.json``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from gatemix.device import resolve_device, resolve_dtype
from gatemix.distill.acceptance import AcceptanceTally
from gatemix.distill.data import DistillDataError, WindowSet, eval_windows
from gatemix.distill.loss import next_token_logprobs
from gatemix.distill.student import ProgressBars, StudentError, sample_continuations
from gatemix.distill.teacher import EnsembleTeacher
from gatemix.distill.train import read_record
from gatemix.engine.project_composite import ensure_composite
from gatemix.errors import UserError
from gatemix.expert_models import Expert
from gatemix.gate.fit.evaluate import EvaluationReport, evaluate_methods
from gatemix.gate.fit.expert_bank import HFExpertBank
from gatemix.gate.fit.report import model_token_logprobs
from gatemix.gate.token_features import TokenFeatures
from gatemix.project import load_project

logger = logging.getLogger(__name__)


def window_features(windows: WindowSet, teacher: EnsembleTeacher, expert_dirs: Sequence[Expert],
                    batch_size: int) -> dict[str, TokenFeatures]:
    """Domain -> every expert's next-token log-probs on its eval windows (the gate report's input).

    Scored by the teacher's own expert models: one copy of the weights in the job.
    """
    dtype = next(teacher.experts[0].parameters()).dtype
    bank = HFExpertBank(expert_dirs, device=str(teacher.device), dtype=dtype, models=teacher.experts)
    features = {}
    for domain in windows.domains:
        rows = windows.windows[domain]
        parts = [bank.score(rows[s : s + batch_size], torch.ones_like(rows[s : s + batch_size]),
                        with_hidden=False)
                 for s in range(0, len(rows), batch_size)]
        features[domain] = TokenFeatures.concat(parts)
    return features


def causal_lm_logprobs(model) -> Callable[[torch.Tensor], torch.Tensor]:
    """A causal LM as ``(B, T)`` ids -> ``(B, T, V)`` next-token log-probs (float32)."""
    return lambda input_ids: torch.log_softmax(model(input_ids=input_ids).logits.float(), dim=-1)


@dataclass
class EnsemblePass:
    """One pass over the eval windows: both models' log-prob of each next token, and the draft tally."""

    ensemble: dict[str, torch.Tensor]  # domain -> (N, T-1)
    student: dict[str, torch.Tensor]  # domain -> (N, T-1)
    draft: AcceptanceTally  # the student as the ensemble's draft


@torch.no_grad()
def ensemble_and_student_pass(teacher, student_logprobs: Callable[[torch.Tensor], torch.Tensor],
                              windows: WindowSet, batch_size: int,
                              draft_tokens: int) -> EnsemblePass:
    """Run the ensemble and the student once on every eval window; score tokens and drafts.

    ``student_logprobs`` maps ``(b, T)`` ids to ``(b, T, V)`` log-probs on the
    teacher's device (``causal_lm_logprobs``); the acceptance figures need both
    full distributions at the same positions, so they are taken here.
    """
    result = EnsemblePass({}, {}, AcceptanceTally(draft_tokens))
    for domain in windows.domains:
        rows = windows.windows[domain]
        ensemble_parts, student_parts = [], []
        for start in range(0, len(rows), batch_size):
            mixture_logprobs, _ = teacher(rows[start : start + batch_size])  # (b, T, V), normalized
            batch = rows[start : start + batch_size].to(mixture_logprobs.device)
            draft_logprobs = student_logprobs(batch)  # (b, T, V)
            ensemble_parts.append(next_token_logprobs(mixture_logprobs, batch).cpu())
            student_parts.append(next_token_logprobs(draft_logprobs, batch).cpu())
            result.draft.add(domain, mixture_logprobs, draft_logprobs)
        result.ensemble[domain] = torch.cat(ensemble_parts)
        result.student[domain] = torch.cat(student_parts)
    return result


def score_models(features: dict[str, TokenFeatures], scored: dict[str, dict[str, torch.Tensor]],
                 models: dict[str, Path]) -> EvaluationReport:
    """The gate report's table over experts, the ``scored`` methods and every folder in ``models``."""
    extra = dict(scored)
    for name, folder in models.items():
        logger.info("scoring %s (%s) on the eval windows", name, folder)
        extra[name] = model_token_logprobs(Path(folder), features)
    return evaluate_methods(features, {}, extra)


def best_single_expert(report: EvaluationReport) -> str:
    experts = [name for name in report.methods if name.startswith("expert:")]
    return min(experts, key=lambda name: report.methods[name].mean_cross_entropy)


@dataclass
class GenerationCheck:
    """Per domain: the ensemble's NLL/token of each system's greedy continuation, and examples."""

    nll: dict[str, dict[str, float]]  # system -> domain -> nats/token
    agreement: dict[str, float]  # domain -> share of continuation tokens where both agree
    examples: dict[str, dict[str, str]]  # domain -> {"prompt", system...}


@torch.no_grad()
def ensemble_greedy(teacher, prompts: torch.Tensor, length: int) -> torch.Tensor:
    """The ensemble's greedy continuation, one ``teacher`` call per token: ``(B, P) -> (B, length)``."""
    sequences = prompts
    while sequences.shape[1] < length:
        mixture_logprobs, _ = teacher(sequences)
        next_ids = mixture_logprobs[:, -1].argmax(-1, keepdim=True).to(sequences.device)
        sequences = torch.cat([sequences, next_ids], dim=1)
    return sequences


@torch.no_grad()
def continuation_nll(teacher, sequences: torch.Tensor, prompt_tokens: int) -> torch.Tensor:
    """``(B, T)`` -> ``(B,)`` the ensemble's NLL per token of everything after the prompt."""
    mixture_logprobs, _ = teacher(sequences)
    token_logprobs = next_token_logprobs(mixture_logprobs, sequences.to(mixture_logprobs.device))
    return -token_logprobs[:, prompt_tokens - 1 :].mean(1).cpu()


def generation_check(teacher, student, tokenizer, windows: WindowSet, *, prompts_per_domain: int,
                     prompt_tokens: int, new_tokens: int, device: str) -> GenerationCheck:
    """Greedy continuations of each domain's first eval prompts by student and ensemble, scored."""
    nll: dict[str, dict[str, float]] = {"student": {}, "ensemble": {}}
    agreement, examples = {}, {}
    length = prompt_tokens + new_tokens
    for domain in windows.domains:
        prompts = windows.windows[domain][:prompts_per_domain, :prompt_tokens].to(device)
        by_system = {
            "student": sample_continuations(student, prompts, length, 0.0, None),
            "ensemble": ensemble_greedy(teacher, prompts, length),
        }
        for system, sequences in by_system.items():
            nll[system][domain] = float(continuation_nll(teacher, sequences, prompt_tokens).mean())
        same = by_system["student"][:, prompt_tokens:] == by_system["ensemble"][:, prompt_tokens:]
        agreement[domain] = float(same.float().mean())
        examples[domain] = {"prompt": tokenizer.decode(prompts[0].tolist())} | {
            system: tokenizer.decode(sequences[0, prompt_tokens:].tolist())
            for system, sequences in by_system.items()}
    return GenerationCheck(nll, agreement, examples)


def student_vs_ensemble(report: EvaluationReport, target: float) -> list[dict]:
    """Per domain: both cross-entropies, the relative gap, and whether it meets ``target``."""
    student, ensemble = report.methods["student"], report.methods["ensemble"]
    rows = []
    for index, domain in enumerate(report.domains):
        gap = student.cross_entropy[index] / ensemble.cross_entropy[index] - 1
        rows.append({"domain": domain, "student": student.cross_entropy[index],
                     "ensemble": ensemble.cross_entropy[index], "gap": gap, "met": gap <= target})
    return rows


def miss_reasons(rows: list[dict], record: dict, report: EvaluationReport) -> list[str]:
    """What the figures say about each missed target (empty when all are met)."""
    missed = [row for row in rows if not row["met"]]
    if not missed:
        return []
    reasons = []
    student = record.get("student", {})
    if student.get("parameters"):
        reasons.append(f"the student has {student['parameters']:,} parameters, one model against "
                       f"the ensemble's {len(report.domains)} experts and its gate")
    evals = [e for e in record.get("evals", []) if e.get("mean_kl") is not None]
    if len(evals) >= 2 and evals[-1]["mean_kl"] < 0.98 * evals[-2]["mean_kl"]:
        reasons.append(f"the held-out KL was still falling at the last evaluation "
                       f"({evals[-2]['mean_kl']:.4f} -> {evals[-1]['mean_kl']:.4f} nats/token): "
                       "more steps would help")
    weights = record.get("domain_weights", {}).get("weights", {})
    for row in missed:
        if weights and weights.get(row["domain"], 1.0) < 1.0 / max(1, len(weights)):
            reasons.append(f"{row['domain']} had a below-uniform share of the batches "
                           f"({weights[row['domain']]:.2f})")
    top_k = record.get("teacher", {}).get("top_k")
    if top_k:
        reasons.append(f"the teacher was kept to its top {top_k} tokens and a tail bucket, so the "
                       "student never saw how the tail's mass is spread")
    return reasons


def build_report(config) -> Path:
    """Score everything ``config`` (a ``DistillReportConfig``) names and write the report; its path."""
    torch.set_num_threads(config.threads)
    bars = ProgressBars(False)  # one "Loading weights" bar per model scored says nothing
    try:
        return _build_report(config)
    finally:
        bars.restore()


def _build_report(config) -> Path:
    # report_write imports this module's tables (GenerationCheck, ...): deferred to break the cycle
    from gatemix.distill.report_write import write_distill_report

    project = load_project(config.project)
    student_dir = Path(config.student) if config.student else project.student_dir
    if not (student_dir / "config.json").is_file():
        raise StudentError(f"student folder {student_dir} not found (no config.json); run "
                           "`gatemix distill` or pass --student")
    record = read_record(student_dir)
    seq_len = config.seq_len or record.get("config", {}).get("seq_len", 128)
    expert_dirs = project.expert_folders()
    tokenizer = AutoTokenizer.from_pretrained(project.tokenizer_dir)
    windows = eval_windows(project, tokenizer, seq_len, config.eval_tokens)
    if not windows.domains:
        raise DistillDataError(f"{project.path}: no eval split holds a window of {seq_len} tokens")
    device = resolve_device(config.device)
    composite = Path(config.composite_dir) if config.composite_dir else ensure_composite(project).path
    teacher = EnsembleTeacher.load(composite, expert_dirs, device=device,
                                   dtype=resolve_dtype("auto", device))
    features = window_features(windows, teacher, expert_dirs, config.batch_size)
    models = dict(project.baselines)
    for item in config.compare:
        name, sep, folder = item.partition("=")
        if not sep:
            raise UserError(f"--compare {item!r} is not name=folder")
        models[name] = Path(folder)
    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).to(device)
    student.eval()
    scored = ensemble_and_student_pass(teacher, causal_lm_logprobs(student), windows,
                                       config.batch_size, config.draft_tokens)
    report = score_models(features, {"ensemble": scored.ensemble, "student": scored.student},
                          models)
    generation = generation_check(
        teacher, student, tokenizer, windows, prompts_per_domain=config.prompts_per_domain,
        prompt_tokens=config.prompt_tokens, new_tokens=config.new_tokens, device=device)
    out_dir = Path(config.out_dir) if config.out_dir else student_dir.with_name(
        student_dir.name + ".report")
    return write_distill_report(
        report, out_dir, record=record, generation=generation, target=config.target,
        compare=list(models), composite=composite, seq_len=seq_len, num_windows=len(windows),
        draft=scored.draft)
