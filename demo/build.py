"""build-demo: real text -> tokenizer -> base -> one expert per domain (+ monolithic).

The experts are Branch-Train-Merge style: a base Llama is trained on the pooled
train split, and each expert starts from it and trains on its own domain only.
The monolithic baseline is one denser model with about the experts' total
parameters, trained on the pooled data for as many tokens as base and experts
saw together. Every model folder is an ordinary Hugging Face folder (weights,
config, generation config and the shared tokenizer) that vLLM loads by itself.

Each stage is reused when its key matches (see ``stages``), so a rerun with the
same config only rewrites ``manifest.json``.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from gatemix.demo import corpus, stages, tokenizer, train
from gatemix.demo.config import DemoConfig
from gatemix.demo.errors import DemoBuildError
from gatemix.demo.train import LlamaShape, TrainSettings

logger = logging.getLogger(__name__)

MANIFEST_FORMAT = "gatemix-demo/1"
WEIGHTS_FILE = "model.safetensors"
MODEL_FILES = ("config.json", WEIGHTS_FILE, "generation_config.json", *tokenizer.TOKENIZER_FILES)
EVAL_FILE = "eval_loss.json"
PROJECT_FILE = "gatemix.toml"
DEMO_PROJECT_NAME = "gatemix-demo"  # the ensemble's served name


@dataclass(frozen=True)
class DemoPaths:
    """Where a built demo lives. ``expert_dirs`` is ordered like ``config.domains``."""

    root: Path
    manifest: Path
    data_dir: Path
    tokenizer_dir: Path
    base_dir: Path
    expert_dirs: dict[str, Path]
    monolithic_dir: Path | None
    eval_dir: Path
    project_file: Path

    @classmethod
    def for_config(cls, config: DemoConfig) -> DemoPaths:
        root = Path(config.out_dir).expanduser().resolve()
        return cls(
            root=root,
            manifest=root / corpus.MANIFEST_FILE,
            data_dir=root / corpus.DATA_DIR,
            tokenizer_dir=root / "tokenizer",
            base_dir=root / "base",
            expert_dirs={domain: root / "experts" / domain for domain in config.domains},
            monolithic_dir=root / "monolithic" if config.build_monolithic else None,
            eval_dir=root / "eval",
            project_file=root / PROJECT_FILE,
        )

    def model_dirs(self) -> dict[str, Path]:
        """Every model by its eval-table name: base, the domains, monolithic."""
        dirs = {"base": self.base_dir, **self.expert_dirs}
        if self.monolithic_dir is not None:
            dirs["monolithic"] = self.monolithic_dir
        return dirs


def build_demo(config: DemoConfig) -> DemoPaths:
    """Build (or reuse) every stage of the demo under ``config.out_dir``."""
    paths = DemoPaths.for_config(config)
    _prepare_root(paths.root)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.num_threads)
    try:
        stamps = _run_stages(config, paths)
    finally:
        torch.set_num_threads(previous_threads)
    stages.write_json_atomic(paths.manifest, _manifest(config, paths, stamps))
    write_demo_project(paths)
    logger.info("demo ready at %s (project file %s)", paths.root, paths.project_file)
    return paths


def write_demo_project(paths: DemoPaths) -> Path:
    """The demo's project file: every later job reads the demo through it, as a user's project.

    Its work folder is the demo folder itself, so the gate, the composite and
    the student land beside the experts (``gate/``, ``composite/``, ``student/``).
    """
    from gatemix.project import write_project_file

    data = {
        domain: {split: [paths.data_dir / domain / f"{split}.jsonl"] for split in corpus.SPLITS}
        for domain in paths.expert_dirs
    }
    baselines = {"monolithic": paths.monolithic_dir} if paths.monolithic_dir is not None else None
    return write_project_file(
        paths.project_file, name=DEMO_PROJECT_NAME, experts=paths.expert_dirs, data=data,
        baselines=baselines, work_dir=paths.root,
    )


def _prepare_root(root: Path) -> None:
    if root.exists() and not root.is_dir():
        raise DemoBuildError(f"demo out_dir {root} exists and is not a folder")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DemoBuildError(f"cannot create demo out_dir {root}: {error}") from None


def _run_stages(config: DemoConfig, paths: DemoPaths) -> dict[str, dict]:
    """Run the stages in dependency order; return each stage's stamp by name."""
    stamps: dict[str, dict] = {}
    streams = _TokenStreams(config, paths)
    stamps["corpus"] = stages.run_stage(
        "corpus", paths.data_dir, stages.stage_key(config.stage_settings("corpus")),
        [corpus.SPLITS_FILE], lambda out: _build_corpus(config, out))
    stamps["tokenizer"] = stages.run_stage(
        "tokenizer", paths.tokenizer_dir,
        stages.stage_key(config.stage_settings("tokenizer"), stamps["corpus"]["build_id"]),
        tokenizer.TOKENIZER_FILES, lambda out: _build_tokenizer(config, paths, out))
    base_key = stages.stage_key(config.stage_settings("model", "training", "base"),
                                stamps["tokenizer"]["build_id"])
    stamps["base"] = stages.run_stage(
        "base", paths.base_dir, base_key, MODEL_FILES,
        lambda out: _build_base(config, paths, streams, out))
    for index, (domain, expert_dir) in enumerate(paths.expert_dirs.items()):
        key = stages.stage_key(config.stage_settings("training", "experts"), domain,
                               stamps["base"]["build_id"])
        stamps[domain] = stages.run_stage(
            f"expert {domain}", expert_dir, key, MODEL_FILES,
            lambda out, domain=domain, index=index: _build_expert(
                config, paths, streams, domain, index, out))
    if paths.monolithic_dir is not None:
        key = stages.stage_key(config.stage_settings("training", "monolithic"),
                               config.monolithic_steps, stamps["tokenizer"]["build_id"])
        stamps["monolithic"] = stages.run_stage(
            "monolithic", paths.monolithic_dir, key, MODEL_FILES,
            lambda out: _build_monolithic(config, paths, streams, out))
    model_build_ids = {name: stamps[name]["build_id"] for name in paths.model_dirs()}
    stamps["eval"] = stages.run_stage(
        "eval", paths.eval_dir,
        stages.stage_key(config.stage_settings("eval", "training"), model_build_ids),
        [EVAL_FILE], lambda out: _build_eval(config, paths, streams, out))
    return stamps


class _TokenStreams:
    """Packed token streams of the stored splits, encoded once per build call."""

    def __init__(self, config: DemoConfig, paths: DemoPaths) -> None:
        self._config, self._paths = config, paths
        self._cache: dict[tuple[str, str], torch.Tensor] = {}

    def get(self, domain: str, split: str) -> torch.Tensor:
        """``(N,)`` token ids of one domain's split; domain ``"*"`` pools all domains."""
        if (domain, split) not in self._cache:
            domains = self._config.domains if domain == "*" else (domain,)
            texts = [text for name in domains
                     for text in corpus.load_split(self._paths.root, name, split)]
            self._cache[domain, split] = train.pack_documents(
                tokenizer.load_tokenizer(self._paths.tokenizer_dir), texts,
                desc=f"tokenize {domain}/{split}", progress=self._config.progress)
        return self._cache[domain, split]


def _build_corpus(config: DemoConfig, out: Path) -> dict:
    listing = corpus.build_corpus(config, out)
    return {domain: {split: len(docs) for split, docs in splits.items()}
            for domain, splits in listing.items()}


def _build_tokenizer(config: DemoConfig, paths: DemoPaths, out: Path) -> dict:
    texts = [text for domain in config.domains
             for text in corpus.load_split(paths.root, domain, "train")]
    texts_bar = tqdm(texts, desc="train tokenizer", unit="doc", disable=not config.progress)
    trained = tokenizer.train_tokenizer(texts_bar, config.vocab_size)
    tokenizer.save_tokenizer(trained, out, model_max_length=config.context_length)
    return {"vocab_size": trained.get_vocab_size(), "sha256": tokenizer.tokenizer_sha256(out)}


def _settings(config: DemoConfig, steps: int, learning_rate: float, seed: int) -> TrainSettings:
    return TrainSettings(
        steps=steps, batch_size=config.batch_size, seq_len=config.seq_len,
        learning_rate=learning_rate, warmup_steps=min(config.warmup_steps, steps // 2),
        min_lr_ratio=config.min_lr_ratio, weight_decay=config.weight_decay,
        grad_clip=config.grad_clip, seed=seed)


def _train_and_save(model: LlamaForCausalLM, stream: torch.Tensor, settings: TrainSettings,
                    name: str, config: DemoConfig, paths: DemoPaths, out: Path) -> dict:
    """One training run into the stage folder ``out``; returns the stamp info."""
    if len(stream) < settings.seq_len:
        raise DemoBuildError(f"{name}: only {len(stream)} train tokens, less than seq_len "
                             f"{settings.seq_len}; collect more text or shorten seq_len")
    final_loss = train.train_causal_lm(model, stream, settings, desc=f"train {name}",
                                       progress=config.progress)
    save_model_folder(model, out, paths.tokenizer_dir)
    return {
        "parameters": train.count_parameters(model),
        "steps": settings.steps,
        "trained_tokens": settings.steps * settings.batch_size * settings.seq_len,
        "final_train_loss": round(final_loss, 4),
        "weights_sha256": stages.file_sha256(out / WEIGHTS_FILE),
    }


def _expert_shape(config: DemoConfig) -> LlamaShape:
    return LlamaShape(config.hidden_size, config.num_layers, config.num_heads,
                      config.num_kv_heads, config.intermediate_size)


def _model_config(config: DemoConfig, paths: DemoPaths, shape: LlamaShape) -> LlamaConfig:
    vocab_size = tokenizer.load_tokenizer(paths.tokenizer_dir).get_vocab_size()
    return train.llama_config(shape, vocab_size=vocab_size, context_length=config.context_length)


def _build_base(config: DemoConfig, paths: DemoPaths, streams: _TokenStreams, out: Path) -> dict:
    model = train.new_model(_model_config(config, paths, _expert_shape(config)), config.seed)
    settings = _settings(config, config.base_steps, config.base_learning_rate, config.seed)
    return _train_and_save(model, streams.get("*", "train"), settings, "base", config, paths,
                           out)


def _build_expert(config: DemoConfig, paths: DemoPaths, streams: _TokenStreams, domain: str,
                  index: int, out: Path) -> dict:
    """Branch from the saved base and train on one domain only."""
    model = LlamaForCausalLM.from_pretrained(paths.base_dir, dtype=torch.float32)
    settings = _settings(config, config.expert_steps, config.expert_learning_rate,
                         config.seed + 1 + index)
    info = _train_and_save(model, streams.get(domain, "train"), settings, f"expert {domain}",
                           config, paths, out)
    return {"domain": domain, **info}


def _build_monolithic(config: DemoConfig, paths: DemoPaths, streams: _TokenStreams,
                      out: Path) -> dict:
    shape = LlamaShape(config.mono_hidden_size, config.mono_num_layers, config.mono_num_heads,
                       config.mono_num_kv_heads, config.mono_intermediate_size)
    model = train.new_model(_model_config(config, paths, shape), config.seed + 100)
    settings = _settings(config, config.monolithic_steps, config.mono_learning_rate,
                         config.seed + 100)
    return _train_and_save(model, streams.get("*", "train"), settings, "monolithic", config,
                           paths, out)


def _build_eval(config: DemoConfig, paths: DemoPaths, streams: _TokenStreams, out: Path) -> dict:
    """``eval_loss[model][domain]``: mean nats per token on each domain's eval split."""
    windows = {domain: train.eval_windows(streams.get(domain, "eval"), config.seq_len,
                                          config.eval_max_tokens)
               for domain in config.domains}
    table: dict[str, dict[str, float]] = {}
    for name, model_dir in tqdm(paths.model_dirs().items(), desc="eval", unit="model",
                                disable=not config.progress):
        model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        table[name] = {domain: round(train.eval_loss(model, domain_windows, config.batch_size), 4)
                       for domain, domain_windows in windows.items()}
    stages.write_json(out / EVAL_FILE, table)
    _log_eval_table(table, config.domains)
    return {"eval_loss": table,
            "eval_tokens": {domain: int(w.numel()) for domain, w in windows.items()}}


def _log_eval_table(table: dict[str, dict[str, float]], domains: tuple[str, ...]) -> None:
    logger.info("eval loss (nats/token), rows: models, columns: %s", ", ".join(domains))
    for name, losses in table.items():
        logger.info("  %-10s %s", name, "  ".join(f"{losses[d]:.3f}" for d in domains))
    for domain in domains:
        best = min(domains, key=lambda expert: table[expert][domain])
        if best != domain:
            logger.warning("expert %s beats expert %s on %s's own eval split",
                           best, domain, domain)


def save_model_folder(model: LlamaForCausalLM, folder: Path, tokenizer_dir: Path) -> None:
    """A self-contained HF model folder: safetensors weights, configs and the tokenizer."""
    model.save_pretrained(folder, safe_serialization=True)
    GenerationConfig(bos_token_id=tokenizer.BOS_ID, eos_token_id=tokenizer.EOS_ID,
                     pad_token_id=tokenizer.PAD_ID).save_pretrained(folder)
    for name in tokenizer.TOKENIZER_FILES:
        shutil.copy2(tokenizer_dir / name, folder / name)
    # The weights are written through a private temp file (mode 0600); a server
    # running as another user must be able to read them.
    for path in folder.iterdir():
        path.chmod(0o644)


def _manifest(config: DemoConfig, paths: DemoPaths, stamps: dict[str, dict]) -> dict:
    splits = json.loads((paths.data_dir / corpus.SPLITS_FILE).read_text(encoding="utf-8"))
    models = {}
    for name, model_dir in paths.model_dirs().items():
        role = "base" if name == "base" else "monolithic" if name == "monolithic" else "expert"
        models[name] = {"role": role, "path": str(model_dir.relative_to(paths.root)),
                        **stamps[name]["info"]}
    eval_loss = stamps["eval"]["info"]["eval_loss"]
    best_expert = {domain: min(config.domains, key=lambda expert: eval_loss[expert][domain])
                   for domain in config.domains}
    return {
        "format": MANIFEST_FORMAT,
        "domains": list(config.domains),
        "experts": {domain: str(path.relative_to(paths.root))
                    for domain, path in paths.expert_dirs.items()},
        "config": config.to_dict(),
        "splits": splits,
        "tokenizer": {"path": str(paths.tokenizer_dir.relative_to(paths.root)),
                      **stamps["tokenizer"]["info"]},
        "models": models,
        "eval_loss": eval_loss,
        "eval_tokens": stamps["eval"]["info"]["eval_tokens"],
        "best_expert": best_expert,  # per domain, the expert with the lowest eval loss
        "stages": {name: {"key": stamp["key"], "build_id": stamp["build_id"],
                          "build_seconds": stamp["build_seconds"]}
                   for name, stamp in stamps.items()},
    }
