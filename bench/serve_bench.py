"""``gatemix bench serve``: the ensemble server against its peers, side by side.

One run on one machine. Each system (see :mod:`gatemix.bench.servers`) is
started in turn and loaded by vLLM's own load generator (``vllm bench serve``,
OpenAI completions backend, random prompts from the experts' tokenizer with a
fixed seed, so every system gets the same prompts), at every concurrency and
prompt length, with greedy 128-token outputs that ignore EOS.

With ``--interleave`` every system is started at once and each point is run
system after system, ``--repeats`` times, so slow drifts of a shared machine
hit the runs of one round alike; the table keeps each point's median run (by
output tokens/s), the ratios are medians of per-round ratios with their range
(:mod:`gatemix.bench.serve_report`), and the JSON keeps every run. On the
2-core CPU machine the HTTP side, not the engine, bounds tiny models (vLLM's
engine core busy-waits on one core, its worker holds the other), and runs of
one server at one point moved 2-3x from minute to minute: pair the servers.

Each point also records the CPU seconds of each system's processes per output
token (:class:`~gatemix.bench.servers.ProcessUsage`); the ratios and the table
are made in :mod:`gatemix.bench.serve_report`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from gatemix.bench.models import BenchModels, check_context, project_models, uniform_composite
from gatemix.bench.serve_report import (
    compute_ratios,
    draft_acceptance,
    format_serve_bench,
    median_point,
    plot_serve_bench,
)
from gatemix.bench.servers import (
    SYSTEMS,
    ProcessUsage,
    RunningSystem,
    ServerOptions,
    ServerStartError,
    launch,
    spec_decode_counters,
)
from gatemix.config_cli import add_config_flags, config_from_args, field_help
from gatemix.defaults import DEFAULT_PROJECT_DIR
from gatemix.errors import UserError

logger = logging.getLogger(__name__)

# vllm bench serve result keys -> our column names
METRICS = {
    "output_throughput": "output_tps",
    "p50_ttft_ms": "ttft_p50_ms",
    "p99_ttft_ms": "ttft_p99_ms",
    "p50_itl_ms": "itl_p50_ms",
    "p99_itl_ms": "itl_p99_ms",
    "completed": "completed",
    "failed": "failed",
    "total_output_tokens": "output_tokens",
    "duration": "duration_s",
}


@dataclass
class ServeBenchConfig:
    project: str = field(
        default=DEFAULT_PROJECT_DIR,
        **field_help("project file, or a folder holding gatemix.toml: the experts, in order"))
    composite: str | None = field(
        default=None,
        **field_help("composite folder of the project's experts (None: the project's, packed when "
                "missing or stale)"))
    student: str | None = field(
        default=None,
        **field_help("distilled student folder (None: the project's student/ when it holds a "
                "config.json; without one the student system is skipped)"))
    draft: str | None = field(
        default=None,
        **field_help("the draft the `draft` system decodes behind (None: the student, as above; "
                "without either that system is skipped)"))
    num_draft_tokens: int = field(default=3, **field_help("tokens the draft proposes per step"))
    systems: tuple[str, ...] = field(
        default=tuple(system for system in SYSTEMS if system != "uniform"),
        **field_help(f"systems to run, in order: {' '.join(SYSTEMS)} (uniform, the experts under a uniform "
                     "gate, only when named)", choices=SYSTEMS))
    concurrency: tuple[int, ...] = field(
        default=(1, 16, 64), **field_help("client max concurrency, one point each (e.g. 1 16 64)"))
    prompt_lens: tuple[int, ...] = field(
        default=(32, 512), **field_help("random prompt tokens, one point each"))
    output_len: int = field(default=128, **field_help("generated tokens per request (EOS ignored)"))
    num_prompts: int | None = field(default=None, **field_help("requests per point (None: max(8c, 32))"))
    lockstep_num_prompts: int | None = field(
        default=None, **field_help("requests per lockstep point (None: max(c, 2))"))
    lockstep_max_concurrency: int = field(
        default=16, **field_help("skip the (slow) lockstep baseline above this concurrency"))
    seed: int = field(default=0, **field_help("prompt sampling seed, the same for every system"))
    dtype: str = field(default="float32", **field_help("engine dtype for every system"))
    kv_cache_gib: int = field(default=1, **field_help("CPU KV cache per engine (whole GiB)"))
    enforce_eager: bool = field(default=True, **field_help("eager mode (no torch.compile) for every engine"))
    out_dir: str = field(default="artifacts/bench", **field_help("results JSON, markdown, PNG and server logs"))
    interleave: bool = field(
        default=False, **field_help("start every system at once and alternate them within each point"))
    repeats: int = field(default=1, **field_help("runs per point and system; the median is kept"))

    def __post_init__(self) -> None:
        if self.repeats < 1:
            raise ValueError("repeats must be positive")
        unknown = set(self.systems) - set(SYSTEMS)
        if unknown or not self.systems:
            raise ValueError(f"unknown systems {sorted(unknown)}; choose from {', '.join(SYSTEMS)}")
        if not self.concurrency or min(self.concurrency) < 1:
            raise ValueError(f"concurrency takes positive integers, got {self.concurrency}")
        if not self.prompt_lens or min(self.prompt_lens) < 1 or self.output_len < 1:
            raise ValueError("prompt lengths and output length must be positive")
        if any(count is not None and count < 1 for count in (self.num_prompts, self.lockstep_num_prompts)):
            raise ValueError("num_prompts and lockstep_num_prompts must be positive")
        if self.lockstep_max_concurrency < 1 or self.kv_cache_gib < 1:
            raise ValueError("lockstep_max_concurrency and kv_cache_gib must be positive")
        if not 1 <= self.num_draft_tokens <= 16:
            raise ValueError("num_draft_tokens must be 1 to 16")

    def prompts_for(self, system: str, concurrency: int) -> int:
        """Long enough points that the ramp-up and drain of the first and last waves are a small part;
        the lockstep baseline, 100x slower, gets about one wave."""
        if system == "lockstep":
            return self.lockstep_num_prompts or max(concurrency, 2)
        return self.num_prompts or max(8 * concurrency, 32)


def run_load(running: RunningSystem, *, tokenizer_dir: str, concurrency: int, prompt_len: int,
             output_len: int, num_prompts: int, seed: int, log_path: Path) -> dict:
    """One ``vllm bench serve`` point against a running system; its printout goes to ``log_path``.

    No warm-up requests: each system is warmed once before its points
    (:func:`_warm_up`), and a point's CPU seconds per token must cover only its own tokens.
    """
    # vllm: deferred, `gatemix bench --help` imports this module for its flags
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    args = parser.parse_args([
        "--backend", "openai", "--base-url", running.base_url, "--endpoint", "/v1/completions",
        "--model", running.model_name, "--tokenizer", tokenizer_dir,
        "--dataset-name", "random", "--random-input-len", str(prompt_len), "--random-output-len", str(output_len),
        "--ignore-eos", "--temperature", "0", "--seed", str(seed),
        "--num-prompts", str(num_prompts), "--max-concurrency", str(concurrency),
        "--num-warmups", "0", "--metric-percentiles", "50,99", "--disable-tqdm",
    ])
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log, contextlib.redirect_stdout(log):
        result = main(args)
    return {ours: float(result[theirs]) for theirs, ours in METRICS.items() if theirs in result}


def run_serve_bench(config: ServeBenchConfig, models: BenchModels) -> dict:
    """Run every system at every point; returns ``{"points": [...], "ratios": [...], ...}``.

    The load's prompts come from the first expert's tokenizer (the experts share one).
    LoRA experts have no folder a plain server loads: their base stands for one
    expert alone (``single``, ``vllm``), and the lockstep baseline is skipped.
    """
    out_dir = Path(config.out_dir)
    lora = models.base_dir is not None
    expert_dirs = [str(models.base_dir)] if lora else [str(folder) for folder in models.expert_dirs]
    tokenizer_dir = expert_dirs[0]
    student_dir = str(models.student_dir) if models.student_dir else None
    max_prompt = max(config.prompt_lens)
    options = ServerOptions(
        max_model_len=max_prompt + config.output_len + 64,  # slack for re-tokenized random prompts
        max_num_seqs=max(config.concurrency), dtype=config.dtype, kv_cache_gib=config.kv_cache_gib,
        enforce_eager=config.enforce_eager, log_dir=out_dir / "logs",
    )
    points, notes = [], []
    draft_dir = config.draft or student_dir
    needs = {"student": student_dir, "draft": draft_dir}
    systems = [system for system in config.systems if needs.get(system, True)
               and not (lora and system == "lockstep")]
    if lora and "lockstep" in config.systems:
        notes.append("lockstep: skipped, the experts are LoRA adapters (it runs one server per whole expert)")
    for system in set(config.systems) - set(systems) - {"lockstep"}:
        notes.append(f"{system}: skipped, no distilled student folder (the project's student/ "
                     "has no config.json; pass --student" + (" or --draft)" if system == "draft" else ")"))
    groups = [systems] if config.interleave else [[system] for system in systems]
    for group in groups:
        with contextlib.ExitStack() as stack:
            running = []
            for system in group:
                logger.info("starting system %s", system)
                try:
                    running.append(stack.enter_context(launch(
                        system, composite_dir=str(models.composite_dir), expert_dirs=expert_dirs,
                        options=options, student_dir=student_dir, draft_dir=draft_dir,
                        num_draft_tokens=config.num_draft_tokens,
                        uniform_dir=str(uniform_composite(models)) if system == "uniform" else None)))
                except ServerStartError as exc:
                    logger.error("%s did not start: %s", system, exc)
                    notes.append(f"{system}: did not start ({str(exc).splitlines()[0]})")
            for system in running:
                _warm_up(config, system, tokenizer_dir, out_dir)
            points += _run_points(config, running, notes, tokenizer_dir, out_dir)
    return {
        "config": asdict(config),
        "models": models.describe(),
        "num_experts": len(models.expert_dirs),
        "engine_options": {k: str(v) for k, v in asdict(options).items()},
        "points": points,
        "ratios": compute_ratios(points, len(models.expert_dirs)),
        "notes": notes,
    }


def _warm_up(config: ServeBenchConfig, running: RunningSystem, tokenizer_dir: str,
             out_dir: Path) -> None:
    """Short untimed requests at the largest batch and prompt, so no point pays for first-call costs."""
    concurrency = max(config.concurrency)
    if running.name == "lockstep":
        concurrency = min(concurrency, config.lockstep_max_concurrency)
    try:
        run_load(running, tokenizer_dir=tokenizer_dir, concurrency=concurrency,
                 prompt_len=max(config.prompt_lens), output_len=16, num_prompts=concurrency, seed=config.seed + 1,
                 log_path=out_dir / "logs" / f"load-{running.name}.log")
    except Exception:  # the timed points will report the failure
        logger.warning("%s warm-up failed", running.name, exc_info=True)


def _measure_point(config: ServeBenchConfig, running: RunningSystem, prompt_len: int, concurrency: int,
                   notes: list[str], tokenizer_dir: str, out_dir: Path) -> dict | None:
    """One timed ``vllm bench serve`` run; None (and a note) when it is skipped or fails."""
    point = {"system": running.name, "concurrency": concurrency, "prompt_len": prompt_len,
             "num_prompts": config.prompts_for(running.name, concurrency)}
    if running.name == "lockstep" and concurrency > config.lockstep_max_concurrency:
        notes.append(f"lockstep: c={concurrency} p={prompt_len} skipped (above "
                     f"--lockstep-max-concurrency {config.lockstep_max_concurrency})")
        return None
    start = time.perf_counter()
    log_path = out_dir / "logs" / f"load-{running.name}.log"
    try:
        drafts_before = spec_decode_counters(running.base_url)
        with ProcessUsage([p.pid for p in running.processes]) as usage:
            point.update(run_load(
                running, tokenizer_dir=tokenizer_dir, concurrency=concurrency,
                prompt_len=prompt_len, output_len=config.output_len, num_prompts=point["num_prompts"],
                seed=config.seed, log_path=log_path,
            ))
        point.update(draft_acceptance(drafts_before, spec_decode_counters(running.base_url)))
    except Exception as exc:  # one bad point must not lose the others' figures
        logger.exception("%s c=%d p=%d failed", running.name, concurrency, prompt_len)
        notes.append(f"{running.name}: c={concurrency} p={prompt_len} failed: {exc!r} (see {log_path})")
        return None
    point["peak_rss_mib"] = usage.peak_mib
    if point.get("output_tokens"):
        point["api_cpu_us_per_token"] = 1e6 * usage.api_cpu_s / point["output_tokens"]
        point["engine_cpu_us_per_token"] = 1e6 * usage.engine_cpu_s / point["output_tokens"]
    logger.info("%s c=%d p=%d: %.1f tok/s, %d failed (%.0fs)", running.name, concurrency, prompt_len,
                point.get("output_tps", 0.0), point.get("failed", 0), time.perf_counter() - start)
    if point.get("failed"):
        notes.append(f"{running.name}: c={concurrency} p={prompt_len} had {point['failed']:.0f} failed "
                     "requests (see logs/load-*.log)")
    return point


def _run_points(config: ServeBenchConfig, systems: list[RunningSystem], notes: list[str],
                tokenizer_dir: str, out_dir: Path) -> list[dict]:
    """Every point for the running systems: system after system within a point, ``repeats`` times."""
    runs: dict[tuple[str, int, int], list[dict]] = {}
    for prompt_len in config.prompt_lens:
        for concurrency in config.concurrency:
            for _ in range(config.repeats):
                for running in systems:
                    point = _measure_point(config, running, prompt_len, concurrency, notes,
                                           tokenizer_dir, out_dir)
                    if point is not None:
                        runs.setdefault((running.name, prompt_len, concurrency), []).append(point)
    return [median_point(group) for group in runs.values()]


# ------------------------------------------------------------------------ CLI
def add_serve_bench_parser(benches) -> None:
    serve = benches.add_parser(
        "serve", help="servers side by side under vLLM's load generator",
        description="Each system (ensemble, single, vllm, student, lockstep) is started in turn "
        "and loaded by `vllm bench serve` at every concurrency and prompt length; the models are "
        "the project's.",
    )
    add_config_flags(serve, ServeBenchConfig)
    serve.set_defaults(run=run_serve)


def serve_bench_models(config: ServeBenchConfig) -> BenchModels:
    """The project's experts and composite, and the student: ``--student`` or the project's."""
    student = Path(config.student) if config.student is not None else None
    if student is not None and not (student / "config.json").is_file():  # before any packing
        raise UserError(f"student folder {student} not found (no config.json)")
    project, models = project_models(config.project, composite=config.composite)
    if student is None and (project.student_dir / "config.json").is_file():
        student = project.student_dir
    check_context(models, max(config.prompt_lens) + config.output_len)
    return dataclasses.replace(models, student_dir=student)


def run_serve(args: argparse.Namespace) -> int:
    config = config_from_args(args, ServeBenchConfig)
    models = serve_bench_models(config)
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = run_serve_bench(config, models)
    report = format_serve_bench(result)
    print(report)
    (out_dir / "serve_bench.json").write_text(json.dumps(result, indent=2))
    (out_dir / "serve_bench.md").write_text(report + "\n")
    if result["points"]:
        plot_serve_bench(result, out_dir / "serve_bench.png")
    print(f"\nwrote {out_dir / 'serve_bench.json'}, {out_dir / 'serve_bench.md'} and {out_dir / 'serve_bench.png'}")
    return 0 if result["points"] else 1
