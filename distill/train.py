"""``gatemix distill``: train one student model on the ensemble's next-token distributions.

The loop, in named stages:

1. ``prepare_run`` (``distill.run``): the project, the student's init
   (tokenizer and vLLM checks first), the windows of each domain, the domain
   weights (uniform, the served gate's lambda, or the data's shares), the
   teacher and its on-disk target cache;
2. ``resume``: the last checkpoint, when there is one, restores the weights,
   the optimizer, the LR schedule, every generator and the records;
3. ``train_step``: a batch drawn by domain weight, an optional on-policy share
   continued by the student and scored live, the loss against the teacher's
   targets (dense, or top-k with a tail bucket) plus ``label_weight`` times
   the data's own cross-entropy;
4. every ``eval_every`` steps the held-out KL and cross-entropy, with the best
   step's student kept; every ``checkpoint_every`` steps a checkpoint;
5. ``finish``: the best (or last) student, a plain Hugging Face folder.

Under ``torchrun`` the same loop runs as DDP (see ``distill.distributed``).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM

from gatemix.distill import checkpoint as ckpt
from gatemix.distill.config import DistillConfig
from gatemix.distill.distributed import Distributed
from gatemix.distill.heldout import evaluate_student, unwrap
from gatemix.distill.loss import TeacherTargets, cross_entropy_loss, distillation_loss
from gatemix.distill.run import BEST_SUBDIR, DistillRun, prepare_run
from gatemix.distill.student import (
    RECORD_FILE,
    ProgressBars,
    StudentError,
    sample_continuations,
    save_student,
)

logger = logging.getLogger(__name__)


def _settings(run: DistillRun) -> dict:
    """The weight-deciding settings, with the project's path made absolute."""
    return {**run.config.result_settings(), "project": str(run.project.path)}


def _rng_state(run: DistillRun) -> dict:
    state = {"sampler": run.sampler.state_dict(), "policy": run.policy_generator.get_state(),
             "torch": torch.get_rng_state()}
    if run.device.startswith("cuda"):
        state["cuda"] = torch.cuda.get_rng_state(torch.device(run.device))
    return state


def _restore_rng(run: DistillRun, state: dict) -> None:
    run.sampler.load_state_dict(state["sampler"])
    run.policy_generator.set_state(state["policy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and run.device.startswith("cuda"):
        torch.cuda.set_rng_state(state["cuda"], torch.device(run.device))


def resume(run: DistillRun) -> ckpt.TrainerState:
    """Stage 2: the last checkpoint's state, or a fresh one (old checkpoints cleared)."""
    fresh = ckpt.TrainerState(settings=_settings(run), world_size=run.dist.world_size)
    path = ckpt.latest_checkpoint(run.run_dir) if run.config.resume else None
    if path is None:
        if run.dist.is_main:
            for stale in (ckpt.checkpoints_dir(run.run_dir), run.run_dir / BEST_SUBDIR):
                shutil.rmtree(stale, ignore_errors=True)
        run.dist.barrier()
        return fresh
    state, rng = ckpt.load_checkpoint(path, unwrap(run.model), run.optimizer, run.schedule,
                                      run.dist.rank)
    ckpt.check_resumable(path, state, fresh.settings, run.dist.world_size)
    _restore_rng(run, rng)
    logger.info("resumed from %s (step %d of %d)", path, state.step, run.config.steps)
    return state


def _batch(run: DistillRun) -> tuple[torch.Tensor, TeacherTargets | None, torch.Tensor]:
    """This process's ``(b, T)`` rows of the step's global batch, their teacher targets, and
    ``(b,)`` which rows are data (not on-policy samples)."""
    config, dist = run.config, run.dist
    window_ids, _ = run.sampler.sample(config.batch_size)  # the same draw on every process
    mine = torch.arange(config.batch_size)[dist.rows(config.batch_size)]
    window_ids = window_ids[mine]
    input_ids = run.train.batch(window_ids)
    on_policy = mine < round(config.on_policy_fraction * config.batch_size)  # (b,)
    if run.train_targets is None:
        return input_ids, None, ~on_policy
    parts, order = [], []
    if (~on_policy).any():
        data_rows = (~on_policy).nonzero().squeeze(1)
        parts.append(run.train_targets.for_windows(window_ids[data_rows], input_ids[data_rows]))
        order.append(data_rows)
    if on_policy.any():
        policy_rows = on_policy.nonzero().squeeze(1)
        prompts = input_ids[policy_rows, : config.on_policy_prompt_tokens].to(run.device)
        sampled = sample_continuations(unwrap(run.model), prompts, config.seq_len,
                                       config.on_policy_temperature, run.policy_generator)
        input_ids[policy_rows] = sampled.cpu()
        parts.append(run.train_targets.live(sampled))
        order.append(policy_rows)
    targets = TeacherTargets.concat(parts)
    return input_ids, targets.select(torch.argsort(torch.cat(order))), ~on_policy


def train_step(run: DistillRun) -> float:
    """Stage 3: one optimizer step; returns the loss averaged over the processes."""
    input_ids, targets, data_rows = _batch(run)
    input_ids = input_ids.to(run.device)
    logits = run.model(input_ids=input_ids).logits  # (b, T, V)
    if targets is None:
        loss = cross_entropy_loss(logits, input_ids)
    else:
        loss = distillation_loss(logits, targets.to(run.device), beta=run.beta,
                                 kind=run.divergence_kind)
        if run.config.label_weight > 0 and data_rows.any():
            loss = loss + run.config.label_weight * cross_entropy_loss(
                logits, input_ids, data_rows.to(run.device))
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if run.config.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.config.grad_clip)
    run.optimizer.step()
    run.schedule.step()
    return float(run.dist.sum(loss.detach()) / run.dist.world_size)


def _evaluate(run: DistillRun, state: ckpt.TrainerState) -> dict:
    """Stage 4: the held-out figures; the best step's student saved when they improve."""
    result = evaluate_student(run.model, run.heldout, run.eval_targets, dist=run.dist,
                              device=run.device, batch_size=run.config.eval_batch_size)
    result["step"] = state.step
    state.evals.append(result)
    metric = result["mean_kl"] if result["mean_kl"] is not None else result["mean_ce"]
    if state.best_metric is None or metric < state.best_metric:
        state.best_step, state.best_metric = state.step, metric
        if run.dist.is_main:
            save_student(unwrap(run.model), run.project.tokenizer_dir, run.run_dir / BEST_SUBDIR,
                         {**run.record, "step": state.step, "heldout": result})
    run.dist.barrier()
    return result


def _checkpoint(run: DistillRun, state: ckpt.TrainerState) -> None:
    rng_states = run.dist.gather_objects(_rng_state(run))
    if run.dist.is_main:
        ckpt.save_checkpoint(run.run_dir, state, unwrap(run.model), run.optimizer, run.schedule,
                             rng_states)
    run.dist.barrier()


def finish(run: DistillRun, state: ckpt.TrainerState) -> Path:
    """Stage 5: write the best (or last) student to ``out_dir`` with the run's record."""
    best = run.run_dir / BEST_SUBDIR
    use_best = run.config.keep == "best" and state.best_step is not None and best.is_dir()
    record = {**run.record, "history": state.history, "evals": state.evals,
              "best_step": state.best_step, "kept": "best" if use_best else "last",
              "kept_step": state.best_step if use_best else state.step,
              "teacher_windows_scored": run.train_targets.scored_windows
              if run.train_targets else 0}
    if run.dist.is_main:
        if use_best:
            model = AutoModelForCausalLM.from_pretrained(best, dtype=torch.float32)
        else:
            model = unwrap(run.model).cpu()
        save_student(model, run.project.tokenizer_dir, run.out_dir, record)
        logger.info("student (%s step %d) written to %s", record["kept"], record["kept_step"],
                    run.out_dir)
    run.dist.barrier()
    return run.out_dir


def _due(step: int, every: int, last: int) -> bool:
    return every > 0 and (step % every == 0 or step == last)


def distill(config: DistillConfig, *, on_step: Callable[[int], None] | None = None) -> Path:
    """Train the student and write it to its folder; returns that path.

    ``on_step(step)`` is called after each step's evaluation and checkpoint
    (tests use it to interrupt a run).
    """
    dist = Distributed.from_env()
    device = dist.device(config.device)
    dist.start(device)
    bars = ProgressBars(config.progress and dist.is_main)
    try:
        if config.batch_size % dist.world_size:
            raise StudentError(f"batch_size {config.batch_size} is not a multiple of the "
                               f"{dist.world_size} processes")
        run = prepare_run(config, dist, device)
        state = resume(run)
        if state.step == 0 and run.heldout is not None:
            _evaluate(run, state)
        with tqdm(total=config.steps, initial=state.step, desc="distill", unit="step",
                  disable=not (config.progress and dist.is_main)) as progress:
            for step in range(state.step + 1, config.steps + 1):
                loss = train_step(run)
                state.step = step
                state.history.append({"step": step, "loss": loss,
                                      "lr": run.schedule.get_last_lr()[0]})
                postfix = {"loss": f"{loss:.4f}"}
                if run.heldout is not None and _due(step, config.eval_every, config.steps):
                    result = _evaluate(run, state)
                    postfix["heldout"] = f"{result['mean_kl'] or result['mean_ce']:.4f}"
                if _due(step, config.checkpoint_every, config.steps):
                    _checkpoint(run, state)
                progress.set_postfix(postfix)
                progress.update(1)
                if on_step is not None:
                    on_step(step)
        return finish(run, state)
    finally:
        bars.restore()
        dist.stop()


def read_record(student_dir: str | Path) -> dict:
    """The run record a student folder carries (``distill.json``), empty if it has none."""
    path = Path(student_dir) / RECORD_FILE
    return json.loads(path.read_text()) if path.is_file() else {}
