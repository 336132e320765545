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
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from gatemix.bench.serve_report import (
    compute_ratios,
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
)

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
    composite_dir: str = field(metadata={"help": "composite folder (gatemix pack output)"})
    expert_dirs: list[str] = field(metadata={"help": "the composite's experts, in order"})
    systems: tuple[str, ...] = field(default=("ensemble", "single", "vllm", "student", "lockstep"),
                                     metadata={"help": "systems to run, in order"})
    concurrencies: tuple[int, ...] = field(default=(1, 16, 64), metadata={"help": "client max concurrency"})
    prompt_lens: tuple[int, ...] = field(default=(32, 512), metadata={"help": "random prompt tokens"})
    output_len: int = field(default=128, metadata={"help": "generated tokens per request (EOS ignored)"})
    num_prompts: int | None = field(default=None, metadata={"help": "requests per point; None: max(8c, 32)"})
    lockstep_num_prompts: int | None = field(default=None,
                                             metadata={"help": "lockstep requests per point; None: max(c, 2)"})
    lockstep_max_concurrency: int = field(default=16, metadata={"help": "skip lockstep points above this"})
    student_dir: str | None = field(default=None, metadata={"help": "distilled student folder, if any"})
    seed: int = field(default=0, metadata={"help": "prompt sampling seed, the same for every system"})
    dtype: str = field(default="float32", metadata={"help": "engine dtype for every system"})
    kv_cache_gib: int = field(default=1, metadata={"help": "CPU KV cache per engine (whole GiB)"})
    enforce_eager: bool = field(default=True, metadata={"help": "eager mode for every engine"})
    out_dir: str = field(default="artifacts/bench", metadata={"help": "JSON, PNG and server logs go here"})
    interleave: bool = field(default=False, metadata={"help": "all systems up at once; points alternate"})
    repeats: int = field(default=1, metadata={"help": "runs per point and system; the median is kept"})

    def __post_init__(self) -> None:
        if self.repeats < 1:
            raise ValueError("repeats must be positive")
        unknown = set(self.systems) - set(SYSTEMS)
        if unknown:
            raise ValueError(f"unknown systems {sorted(unknown)}; choose from {', '.join(SYSTEMS)}")
        if min(self.concurrencies) < 1 or min(self.prompt_lens) < 1 or self.output_len < 1:
            raise ValueError("concurrencies, prompt lengths and output length must be positive")
        if any(count is not None and count < 1 for count in (self.num_prompts, self.lockstep_num_prompts)):
            raise ValueError("num_prompts and lockstep_num_prompts must be positive")

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


def run_serve_bench(config: ServeBenchConfig) -> dict:
    """Run every system at every point; returns ``{"points": [...], "ratios": [...], ...}``."""
    out_dir = Path(config.out_dir)
    max_prompt = max(config.prompt_lens)
    options = ServerOptions(
        max_model_len=max_prompt + config.output_len + 64,  # slack for re-tokenized random prompts
        max_num_seqs=max(config.concurrencies), dtype=config.dtype, kv_cache_gib=config.kv_cache_gib,
        enforce_eager=config.enforce_eager, log_dir=out_dir / "logs",
    )
    points, notes = [], []
    systems = [system for system in config.systems if system != "student" or config.student_dir]
    if "student" in config.systems and not config.student_dir:
        notes.append("student: skipped, no distilled student folder given (--student)")
    groups = [systems] if config.interleave else [[system] for system in systems]
    for group in groups:
        with contextlib.ExitStack() as stack:
            running = []
            for system in group:
                logger.info("starting system %s", system)
                try:
                    running.append(stack.enter_context(launch(
                        system, composite_dir=config.composite_dir, expert_dirs=config.expert_dirs,
                        options=options, student_dir=config.student_dir)))
                except ServerStartError as exc:
                    logger.error("%s did not start: %s", system, exc)
                    notes.append(f"{system}: did not start ({str(exc).splitlines()[0]})")
            for system in running:
                _warm_up(config, system, out_dir)
            points += _run_points(config, running, notes, out_dir)
    return {
        "config": asdict(config),
        "num_experts": len(config.expert_dirs),
        "engine_options": {k: str(v) for k, v in asdict(options).items()},
        "points": points,
        "ratios": compute_ratios(points, len(config.expert_dirs)),
        "notes": notes,
    }


def _warm_up(config: ServeBenchConfig, running: RunningSystem, out_dir: Path) -> None:
    """Short untimed requests at the largest batch and prompt, so no point pays for first-call costs."""
    concurrency = max(config.concurrencies)
    if running.name == "lockstep":
        concurrency = min(concurrency, config.lockstep_max_concurrency)
    try:
        run_load(running, tokenizer_dir=config.expert_dirs[0], concurrency=concurrency,
                 prompt_len=max(config.prompt_lens), output_len=16, num_prompts=concurrency, seed=config.seed + 1,
                 log_path=out_dir / "logs" / f"load-{running.name}.log")
    except Exception:  # the timed points will report the failure
        logger.warning("%s warm-up failed", running.name, exc_info=True)


def _measure_point(config: ServeBenchConfig, running: RunningSystem, prompt_len: int, concurrency: int,
                   notes: list[str], out_dir: Path) -> dict | None:
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
        with ProcessUsage([p.pid for p in running.processes]) as usage:
            point.update(run_load(
                running, tokenizer_dir=config.expert_dirs[0], concurrency=concurrency,
                prompt_len=prompt_len, output_len=config.output_len, num_prompts=point["num_prompts"],
                seed=config.seed, log_path=log_path,
            ))
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
                out_dir: Path) -> list[dict]:
    """Every point for the running systems: system after system within a point, ``repeats`` times."""
    runs: dict[tuple[str, int, int], list[dict]] = {}
    for prompt_len in config.prompt_lens:
        for concurrency in config.concurrencies:
            for _ in range(config.repeats):
                for running in systems:
                    point = _measure_point(config, running, prompt_len, concurrency, notes, out_dir)
                    if point is not None:
                        runs.setdefault((running.name, prompt_len, concurrency), []).append(point)
    return [median_point(group) for group in runs.values()]


# ------------------------------------------------------------------------ CLI
def add_serve_bench_parser(benches) -> None:
    serve = benches.add_parser("serve", help="servers side by side under vLLM's load generator")
    serve.add_argument("--demo-dir", default="artifacts/demo",
                       help="demo build: <demo-dir>/composite and <demo-dir>/experts/<name>")
    serve.add_argument("--composite", help="composite folder (default: <demo-dir>/composite)")
    serve.add_argument("--student", help="distilled student folder (the student system is skipped without it)")
    serve.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated subset of {','.join(SYSTEMS)}")
    serve.add_argument("--concurrency", default="1,16,64", help="comma-separated client concurrencies")
    serve.add_argument("--prompt-lens", default="32,512", help="comma-separated prompt lengths (tokens)")
    serve.add_argument("--output-len", type=int, default=128)
    serve.add_argument("--num-prompts", type=int, help="requests per point (default max(8*concurrency, 32))")
    serve.add_argument("--lockstep-num-prompts", type=int,
                       help="requests per lockstep point (default max(concurrency, 2))")
    serve.add_argument("--lockstep-max-concurrency", type=int, default=16,
                       help="skip the (slow) lockstep baseline above this concurrency")
    serve.add_argument("--dtype", default="float32")
    serve.add_argument("--kv-cache-gib", type=int, default=1, help="CPU KV cache per engine (whole GiB)")
    serve.add_argument("--compile", action="store_true", help="let vLLM torch.compile the models (all systems)")
    serve.add_argument("--out-dir", default="artifacts/bench", help="results JSON, markdown, PNG and server logs")
    serve.add_argument("--interleave", action="store_true",
                       help="start every system at once and alternate them within each point")
    serve.add_argument("--repeats", type=int, default=1, help="runs per point and system; the median is kept")
    serve.set_defaults(run=run_serve)


def _int_list(text: str, flag: str) -> tuple[int, ...]:
    from gatemix.errors import UserError

    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UserError(f"{flag} takes comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise UserError(f"{flag} takes positive integers, got {text!r}")
    return values


def config_from_args(args: argparse.Namespace) -> ServeBenchConfig:
    from gatemix.engine.composite_folder import CompositeInfo

    from gatemix.errors import UserError

    demo_dir = Path(args.demo_dir)
    composite = Path(args.composite) if args.composite else demo_dir / "composite"
    if not composite.is_dir():
        raise UserError(f"{composite} not found: run `gatemix build-demo --out {demo_dir}` or pass --composite")
    expert_dirs = [demo_dir / "experts" / name for name in CompositeInfo.read(composite).expert_names]
    missing = [str(d) for d in expert_dirs if not d.is_dir()]
    if missing:
        raise UserError(f"expert folders not found: {', '.join(missing)} (pass --demo-dir)")
    if args.student and not Path(args.student).is_dir():
        raise UserError(f"student folder {args.student} not found")
    systems = tuple(s.strip() for s in args.systems.split(",") if s.strip())
    prompt_lens = _int_list(args.prompt_lens, "--prompt-lens")
    context = json.loads((expert_dirs[0] / "config.json").read_text()).get("max_position_embeddings")
    if context and max(prompt_lens) + args.output_len > context:
        raise UserError(f"prompt {max(prompt_lens)} + output {args.output_len} tokens exceed the experts' "
                        f"context of {context}; lower --prompt-lens or --output-len")
    try:
        return ServeBenchConfig(
            composite_dir=str(composite), expert_dirs=[str(d) for d in expert_dirs], systems=systems,
            concurrencies=_int_list(args.concurrency, "--concurrency"), prompt_lens=prompt_lens,
            output_len=args.output_len, num_prompts=args.num_prompts, lockstep_num_prompts=args.lockstep_num_prompts,
            lockstep_max_concurrency=args.lockstep_max_concurrency, student_dir=args.student, dtype=args.dtype,
            kv_cache_gib=args.kv_cache_gib, enforce_eager=not args.compile, out_dir=args.out_dir,
            interleave=args.interleave, repeats=args.repeats,
        )
    except ValueError as exc:
        raise UserError(str(exc)) from None


def run_serve(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = run_serve_bench(config)
    report = format_serve_bench(result)
    print(report)
    (out_dir / "serve_bench.json").write_text(json.dumps(result, indent=2))
    (out_dir / "serve_bench.md").write_text(report + "\n")
    if result["points"]:
        plot_serve_bench(result, out_dir / "serve_bench.png")
    print(f"\nwrote {out_dir / 'serve_bench.json'}, {out_dir / 'serve_bench.md'} and {out_dir / 'serve_bench.png'}")
    return 0 if result["points"] else 1
