"""The student: where its weights start, what vLLM must be able to serve, and the folder it ends in.

A student is any ``AutoModelForCausalLM`` over the experts' vocabulary:

- ``expert``: a copy of one expert (its architecture and weights);
- ``model``: any folder, or a project baseline, such as the shared base the
  experts were fine-tuned from;
- ``config``: fresh weights from a config (an expert's by default) with
  overrides, e.g. fewer layers for a smaller, faster student.

Its tokenizer must be the experts' (same fingerprint and vocabulary size),
else the teacher's distributions are over other tokens; and where vLLM is
installed its architecture must be one vLLM serves, else the folder would
train and then not load. Both are checked before any training. The output is
a plain Hugging Face folder with the first expert's tokenizer files, which
``gatemix serve --model-dir`` (vLLM, no plugin) serves alone.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from gatemix.atomic_write import atomic_folder
from gatemix.errors import UserError
from gatemix.expert_folder import TOKENIZER_FILES, ExpertFolderError, tokenizer_fingerprint
from gatemix.project import Project

logger = logging.getLogger(__name__)

# Copied from the first expert next to the student's weights (as `gatemix pack` does).
COPIED_FILES = (*TOKENIZER_FILES, "generation_config.json", "chat_template.jinja")
RECORD_FILE = "distill.json"


class StudentError(UserError):
    """A student that cannot be trained or would not be served; one line."""


def init_folder(init: str, init_from: str, project: Project) -> Path:
    """The folder the student's weights (``expert``, ``model``) or config (``config``) come from.

    LoRA experts share one base, and the student starts from it: an adapter
    folder holds no whole model to start from."""
    if init == "expert":
        name = init_from or project.domains[0]
        if name not in project.experts:
            raise StudentError(f"--init-from {name!r} is not an expert of {project.path} "
                               f"(experts: {', '.join(project.domains)})")
        return project.expert_folders()[project.domains.index(name)].model_dir
    if init == "model":
        if not init_from:
            raise StudentError("--init model needs --init-from <folder or [baselines] name>")
        folder = project.baselines.get(init_from, Path(init_from).expanduser())
    else:
        folder = Path(init_from).expanduser() if init_from else project.tokenizer_dir
    if not (folder / "config.json").is_file():
        raise StudentError(f"student init folder {folder} has no config.json")
    return folder


def parse_overrides(spec: str) -> dict:
    """``"a=1,b=x,c=true"`` -> ``{"a": 1, "b": "x", "c": True}`` (JSON values where they parse)."""
    overrides = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise StudentError(f"--student-config item {item!r} is not key=value")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        overrides[key.strip()] = value
    return overrides


def student_config(init: str, folder: Path, overrides: str) -> dict:
    """The student's config.json as a dict, with ``--student-config`` applied for ``config``."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise StudentError(f"{folder}/config.json: unreadable ({exc})") from exc
    if init == "config":
        config.update(parse_overrides(overrides))
    return config


def check_tokenizer(folder: Path, config: dict, expert_folder: Path, vocab_size: int) -> None:
    """Refuse a student whose tokenizer or vocabulary is not the experts'."""
    if config.get("vocab_size") != vocab_size:
        raise StudentError(
            f"student {folder} has vocab_size {config.get('vocab_size')}, the experts "
            f"{vocab_size}: teacher and student must share one tokenizer")
    if not (folder / "tokenizer.json").is_file():
        return  # a bare config or weights: the experts' tokenizer is the one written out
    try:
        same = tokenizer_fingerprint(folder) == tokenizer_fingerprint(expert_folder)
    except ExpertFolderError as exc:
        raise StudentError(str(exc)) from exc
    if not same:
        raise StudentError(
            f"student {folder} has a different tokenizer from the experts' ({expert_folder}): "
            "teacher and student must share one tokenizer")


def check_servable(architecture: str, where: str) -> None:
    """Refuse an architecture the installed vLLM cannot load (skipped where vLLM is absent)."""
    try:
        from vllm import ModelRegistry  # optional: a training machine may have no vLLM
    except ImportError:
        logger.info("vLLM is not installed: %s's architecture is not checked", where)
        return
    if architecture not in set(ModelRegistry.get_supported_archs()):
        raise StudentError(
            f"{where}: architecture {architecture} is not one the installed vLLM serves; "
            "choose a student of a vLLM architecture (e.g. LlamaForCausalLM, Qwen3ForCausalLM)")


def build_student(init: str, folder: Path, config: dict, seed: int) -> torch.nn.Module:
    """The student in float32: pretrained weights from ``folder``, or fresh ones from ``config``."""
    try:
        if init == "config":
            model_config = AutoConfig.for_model(**config)
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(model_config, dtype=torch.float32)
        else:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    except (ValueError, OSError, TypeError, KeyError) as exc:
        reason = " ".join(str(exc).split())[:200]
        raise StudentError(f"student from {folder}: transformers cannot build it ({reason})") from exc
    check_servable(type(model).__name__, f"student from {folder}")
    return model


@torch.no_grad()
def sample_continuations(model: torch.nn.Module, prompts: torch.Tensor, length: int,
                         temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """``(B, P)`` prompts -> ``(B, length)`` sequences: the model continues each prompt.

    Temperature 0 is greedy. Sampling draws on the CPU from ``generator``, so a
    checkpointed generator replays the same samples on any device.
    """
    was_training = model.training
    model.eval()
    sequences = prompts
    out = model(input_ids=prompts, use_cache=True)
    while sequences.shape[1] < length:
        logits = out.logits[:, -1].float()
        if temperature == 0:
            next_ids = logits.argmax(-1, keepdim=True)
        else:
            probs = torch.softmax(logits.double().cpu() / temperature, -1)
            next_ids = torch.multinomial(probs, 1, generator=generator).to(prompts.device)
        sequences = torch.cat([sequences, next_ids], dim=1)
        out = model(input_ids=next_ids, past_key_values=out.past_key_values, use_cache=True)
    model.train(was_training)
    return sequences


class ProgressBars:
    """Turn transformers' own bars (weight loading, saving) on or off; ``restore`` undoes it."""

    def __init__(self, shown: bool) -> None:
        self._logging = hf_logging
        self._was_shown = hf_logging.is_progress_bar_enabled()
        (hf_logging.enable_progress_bar if shown else hf_logging.disable_progress_bar)()

    def restore(self) -> None:
        if self._was_shown:
            self._logging.enable_progress_bar()
        else:
            self._logging.disable_progress_bar()


def _save_quietly(model: torch.nn.Module, folder: Path) -> None:
    """``save_pretrained`` without its per-save progress bar (a run saves at every best step)."""
    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(folder, safe_serialization=True)
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def save_student(model: torch.nn.Module, tokenizer_dir: Path, out: Path, record: dict) -> Path:
    """Write the student folder atomically: weights, config, the experts' tokenizer, the run record."""
    out = Path(out)
    with atomic_folder(out) as staging:
        _save_quietly(model, staging)
        for name in COPIED_FILES:
            source = Path(tokenizer_dir) / name
            if source.is_file():
                shutil.copy2(source, staging / name)
        (staging / RECORD_FILE).write_text(json.dumps(record, indent=1, default=str))
    return out
