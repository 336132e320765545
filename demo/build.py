"""build-demo: real text -> tokenizer -> base -> one expert per domain -> the robust gate.

The experts are Branch-Train-Merge style: a base Llama is trained on the pooled
train split, and each expert starts from it and trains on its own domain only.
The last stage fits the robust gate (``gatemix fit-gate`` on the demo's own
project file) into ``<out>/gate``, which ``gatemix serve`` packs and serves.
The two monolithic baselines (``baselines.py``) are built only when asked
(``with_baselines``: the report and the benchmarks), and reused once built.
Every model folder is an ordinary Hugging Face folder (weights, config,
generation config and the shared tokenizer) that vLLM loads by itself.

Each stage is reused when its key matches (see ``stages``), so a rerun with the
same config only rewrites ``manifest.json`` and the project file.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from gatemix.data_sources import file_sha256
from gatemix.demo import baselines, corpus, sources, stages, tokenizer, train
from gatemix.demo.baselines import BASELINES, Baseline
from gatemix.demo.config import DemoConfig
from gatemix.demo.errors import DemoBuildError
from gatemix.demo.paths import DemoPaths
from gatemix.demo.train import LlamaShape, TrainSettings
from gatemix.gate.fit.config import FitGateConfig
from gatemix.gate.fit.pipeline import fit_gate
from gatemix.project_writer import write_project_file

logger = logging.getLogger(__name__)

MANIFEST_FORMAT = "gatemix-demo/1"
WEIGHTS_FILE = "model.safetensors"
MODEL_FILES = ("config.json", WEIGHTS_FILE, "generation_config.json", *tokenizer.TOKENIZER_FILES)
EVAL_FILE = "eval_loss.json"
GATE_FILES = ("router.json", "router.safetensors")
DEMO_PROJECT_NAME = "gatemix-demo"  # the ensemble's served name


def build_demo(config: DemoConfig) -> DemoPaths:
    """Build (or reuse) every stage of the demo under ``config.out_dir``."""
    _prepare_root(DemoPaths.for_config(config).root)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.num_threads)
    try:
        stamps, paths = _run_stages(config)
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
    It names the baselines that are built and the out-of-domain text.
    """
    data = {
        domain: {split: [paths.data_dir / domain / f"{split}.jsonl"] for split in corpus.SPLITS}
        for domain in paths.expert_dirs
    }
    ood_file = paths.ood_dir / corpus.OOD_FILE
    has_ood = ood_file.is_file() and ood_file.read_text(encoding="utf-8").strip()
    return write_project_file(
        paths.project_file, name=DEMO_PROJECT_NAME, experts=paths.expert_dirs, data=data,
        baselines=paths.baseline_dirs or None, work_dir=paths.root,
        out_of_domain=[ood_file] if has_ood else None,
    )


def _prepare_root(root: Path) -> None:
    if root.exists() and not root.is_dir():
        raise DemoBuildError(f"demo out_dir {root} exists and is not a folder")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DemoBuildError(f"cannot create demo out_dir {root}: {error}") from None


def _run_stages(config: DemoConfig) -> tuple[dict[str, dict], DemoPaths]:
    """Run the stages in dependency order; return each stage's stamp by name, and the paths."""
    paths = DemoPaths.for_config(config)
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
    stamps.update(_baseline_stages(config, paths, streams, stamps))
    paths = DemoPaths.for_config(config, tuple(b.name for b in BASELINES if b.name in stamps))
    model_build_ids = {name: stamps[name]["build_id"] for name in paths.model_dirs()}
    stamps["eval"] = stages.run_stage(
        "eval", paths.eval_dir,
        stages.stage_key(config.stage_settings("eval", "training"), model_build_ids),
        [EVAL_FILE], lambda out: _build_eval(config, paths, streams, out))
    stamps["out_of_domain"] = stages.run_stage(
        "out-of-domain text", paths.ood_dir,
        stages.stage_key(config.stage_settings("ood"), config.seed, config.max_chars_per_doc,
                         config.min_chars_per_doc),
        [corpus.OOD_FILE], lambda out: {"documents": corpus.write_out_of_domain(
            out, sources.collect_out_of_domain(config))})
    if config.fit_gate:
        write_demo_project(paths)  # the fit reads the demo through its project file
        gate_key = stages.stage_key(
            config.stage_settings("gate"),
            {name: stamps[name]["build_id"] for name in ("corpus", "out_of_domain", *paths.model_dirs())})
        stamps["gate"] = stages.run_stage(
            "robust gate", paths.gate_dir, gate_key, GATE_FILES,
            lambda out: _build_gate(config, paths, out))
    return stamps, paths


def _baseline_stages(config: DemoConfig, paths: DemoPaths, streams: _TokenStreams,
                     stamps: dict[str, dict]) -> dict[str, dict]:
    """Each baseline built when asked for; else its folder reused where it is built and current."""
    built = {}
    for baseline in BASELINES:
        folder = paths.root / baseline.folder
        key = stages.stage_key(config.stage_settings("training", "monolithic"), baseline.name,
                               baseline.steps(config), stamps["tokenizer"]["build_id"],
                               stamps["base"]["build_id"] if baseline.matched == "compute" else None)
        files = (*MODEL_FILES, baselines.BASELINE_FILE)
        if config.with_baselines and baseline.name in config.baselines:
            built[baseline.name] = stages.run_stage(
                baseline.name, folder, key, files,
                lambda out, baseline=baseline: _build_baseline(
                    config, paths, streams, baseline, stamps, out))
        elif (stamp := stages.find_done(folder, key, files)) is not None:
            built[baseline.name] = stamp
    return built


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
        "weights_sha256": file_sha256(out / WEIGHTS_FILE),
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


def _build_baseline(config: DemoConfig, paths: DemoPaths, streams: _TokenStreams,
                    baseline: Baseline, stamps: dict[str, dict], out: Path) -> dict:
    model_config = _model_config(config, paths, baselines.monolithic_shape(config))
    model = baselines.new_baseline_model(baseline, config, paths.base_dir, model_config)
    settings = _settings(config, baseline.steps(config), baselines.learning_rate(baseline, config),
                         config.seed + baseline.seed_offset)
    info = _train_and_save(model, streams.get("*", "train"), settings, baseline.name, config,
                           paths, out)
    base = stamps["base"]["info"]
    experts_flops = baselines.experts_training_flops(
        base["parameters"], base["trained_tokens"],
        [stamps[domain]["info"]["trained_tokens"] for domain in paths.expert_dirs])
    record = baselines.write_baseline_file(out, baseline, info, experts_flops,
                                           base["trained_tokens"])
    return {**info, "matched": baseline.matched, "train_flops": record["train_flops"],
            "compute_vs_experts": record["compute_vs_experts"]}


def _build_gate(config: DemoConfig, paths: DemoPaths, out: Path) -> dict:
    """The robust gate fitted on the demo's project, the artifact ``gatemix serve`` packs."""
    fit_config = FitGateConfig(
        project=str(paths.project_file), out_dir=str(out), steps=config.gate_steps,
        two_stage=config.gate_two_stage, max_sequences=config.gate_max_sequences,
        seed=config.seed, torch_threads=config.num_threads, progress=config.progress,
    )
    artifact = fit_gate(fit_config)
    details = artifact.details
    evaluation = details.get("evaluation", {})
    served = evaluation.get("robust_router", {})
    return {
        "version": artifact.version,
        "served_router": details["served_router"],
        "worst_excess": served.get("worst_excess"),
        "switching": served.get("switching"),
        "out_of_domain": served.get("out_of_domain"),
    }


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
        role = ("base" if name == "base" else "baseline" if name in paths.baseline_dirs
                else "expert")
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
        "out_of_domain_documents": len(stamps["out_of_domain"]["info"]["documents"]),
        "gate": stamps["gate"]["info"] if "gate" in stamps else None,  # what serve serves
        "stages": {name: {"key": stamp["key"], "build_id": stamp["build_id"],
                          "build_seconds": stamp["build_seconds"]}
                   for name, stamp in stamps.items()},
    }
