"""``gatemix bench serve``: the ensemble server against its peers, side by side.

One run on one machine. Each system (see :mod:`gatemix.bench.servers`) is
started in turn and loaded by vLLM's own load generator (``vllm bench serve``,
OpenAI completions backend, random prompts from the experts' tokenizer with a
fixed seed, so every system gets the same prompts), at every concurrency and
prompt length, with greedy 128-token outputs that ignore EOS.

With ``--interleave`` every system is started at once and each point is run
system after system, ``--repeats`` times, so slow drifts of a shared machine
hit every system alike; the table keeps each point's median run (by output
tokens/s) and the JSON every run. On a 2-core machine, runs of one system
at one point differed by 1.2x to 4x, more than the systems differ, and with
three servers up the API processes were starved (TTFT p50 of seconds for
every system); there the mode shows the noise rather than removing it.

Ratios, per concurrency and prompt length:

* efficiency ``E = K * tps(ensemble) / tps(gatemix single)``: 1 when K
  experts cost exactly K times one, i.e. mixing and gating add nothing;
* server overhead ``tps(gatemix single) / tps(vllm serve)``;
* speed-up over lockstep ``tps(ensemble) / tps(lockstep)``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from gatemix.bench.servers import (
    SYSTEMS,
    PeakMemory,
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
    "duration": "duration_s",
}
SYSTEM_LABELS = {
    "ensemble": "gatemix ensemble (K experts)",
    "single": "gatemix, one expert",
    "vllm": "vllm serve, one expert",
    "student": "gatemix student",
    "lockstep": "lockstep ensemble (K vLLM + mixer)",
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
    num_prompts: int | None = field(default=None, metadata={"help": "requests per point; None: max(2c, 8)"})
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
        if self.num_prompts is not None and self.num_prompts < 1:
            raise ValueError("num_prompts must be positive")

    def prompts_for(self, concurrency: int) -> int:
        return self.num_prompts or max(2 * concurrency, 8)


def run_load(running: RunningSystem, *, tokenizer_dir: str, concurrency: int, prompt_len: int,
             output_len: int, num_prompts: int, seed: int, log_path: Path) -> dict:
    """One ``vllm bench serve`` point against a running system; its printout goes to ``log_path``."""
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
        "--num-warmups", str(min(concurrency, 4)), "--metric-percentiles", "50,99", "--disable-tqdm",
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
             "num_prompts": config.prompts_for(concurrency)}
    if running.name == "lockstep" and concurrency > config.lockstep_max_concurrency:
        notes.append(f"lockstep: c={concurrency} p={prompt_len} skipped (above "
                     f"--lockstep-max-concurrency {config.lockstep_max_concurrency})")
        return None
    start = time.perf_counter()
    log_path = out_dir / "logs" / f"load-{running.name}.log"
    try:
        with PeakMemory([p.pid for p in running.processes]) as memory:
            point.update(run_load(
                running, tokenizer_dir=config.expert_dirs[0], concurrency=concurrency,
                prompt_len=prompt_len, output_len=config.output_len, num_prompts=point["num_prompts"],
                seed=config.seed, log_path=log_path,
            ))
    except Exception as exc:  # one bad point must not lose the others' figures
        logger.exception("%s c=%d p=%d failed", running.name, concurrency, prompt_len)
        notes.append(f"{running.name}: c={concurrency} p={prompt_len} failed: {exc!r} (see {log_path})")
        return None
    point["peak_rss_mib"] = memory.peak_mib
    logger.info("%s c=%d p=%d: %.1f tok/s, %d failed (%.0fs)", running.name, concurrency, prompt_len,
                point.get("output_tps", 0.0), point.get("failed", 0), time.perf_counter() - start)
    if point.get("failed"):
        notes.append(f"{running.name}: c={concurrency} p={prompt_len} had {point['failed']:.0f} failed "
                     "requests (see logs/load-*.log)")
    return point


def median_point(runs: list[dict]) -> dict:
    """The run with the median output tokens/s, carrying every run's figure and the peak memory of all."""
    ordered = sorted(runs, key=lambda run: run.get("output_tps", 0.0))
    point = dict(ordered[(len(ordered) - 1) // 2])
    point["output_tps_runs"] = [run.get("output_tps") for run in runs]
    point["peak_rss_mib"] = max(run.get("peak_rss_mib", 0.0) for run in runs)
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


def compute_ratios(points: list[dict], num_experts: int) -> list[dict]:
    """Per (prompt_len, concurrency): E, server overhead and speed-up over lockstep (None if missing)."""
    tps = {(p["system"], p["prompt_len"], p["concurrency"]): p.get("output_tps") for p in points}
    keys = sorted({(p["prompt_len"], p["concurrency"]) for p in points})

    def ratio(numerator: float | None, denominator: float | None) -> float | None:
        return numerator / denominator if numerator and denominator else None

    ratios = []
    for prompt_len, concurrency in keys:
        ensemble, single, vllm, lockstep = (tps.get((s, prompt_len, concurrency))
                                            for s in ("ensemble", "single", "vllm", "lockstep"))
        ratios.append({
            "prompt_len": prompt_len, "concurrency": concurrency,
            "efficiency_E": ratio(num_experts * ensemble if ensemble else None, single),
            "server_overhead": ratio(single, vllm),
            "speedup_over_lockstep": ratio(ensemble, lockstep),
        })
    return ratios


def _cell(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _tps_cell(point: dict) -> str:
    """Output tokens/s, with the range of the runs when a point was repeated."""
    runs = [run for run in point.get("output_tps_runs") or [] if run]
    cell = _cell(point.get("output_tps"))
    return f"{cell} ({min(runs):.0f}-{max(runs):.0f})" if len(runs) > 1 else cell


def format_serve_bench(result: dict) -> str:
    """The markdown table, the ratios and the notes."""
    config = result["config"]
    lines = [
        (f"gatemix bench serve: K = {result['num_experts']} experts, output {config['output_len']} tokens, "
        f"greedy, dtype {config['dtype']}, load from `vllm bench serve` (openai backend, random prompts, "
        f"seed {config['seed']})"),
        "",
        ("| system | concurrency | prompt len | output tok/s | TTFT p50 (ms) | TTFT p99 (ms) "
        "| ITL p50 (ms) | ITL p99 (ms) | peak RSS (MiB) |"),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in result["points"]:
        lines.append(
            f"| {SYSTEM_LABELS.get(p['system'], p['system'])} | {p['concurrency']} | {p['prompt_len']} "
            f"| {_tps_cell(p)} | {_cell(p.get('ttft_p50_ms'))} | {_cell(p.get('ttft_p99_ms'))} "
            f"| {_cell(p.get('itl_p50_ms'), 2)} | {_cell(p.get('itl_p99_ms'), 2)} | {_cell(p.get('peak_rss_mib'), 0)} |"
        )
    lines += [
        "",
        ("| concurrency | prompt len | E = K*tps(ensemble)/tps(single) | overhead = tps(single)/tps(vllm) "
        "| speed-up = tps(ensemble)/tps(lockstep) |"),
        "|---:|---:|---:|---:|---:|",
    ]
    for r in result["ratios"]:
        speedup = _cell(r["speedup_over_lockstep"]) + ("x" if r["speedup_over_lockstep"] else "")
        lines.append(f"| {r['concurrency']} | {r['prompt_len']} | {_cell(r['efficiency_E'], 3)} "
                     f"| {_cell(r['server_overhead'], 3)} | {speedup} |")
    if result.get("notes"):
        lines += ["", *(f"- {note}" for note in result["notes"])]
    return "\n".join(lines)


def plot_serve_bench(result: dict, path: Path) -> None:
    """Output tokens/s against concurrency: one line per system, one subplot per prompt length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prompt_lens = sorted({p["prompt_len"] for p in result["points"]}) or [0]
    fig, axes = plt.subplots(1, len(prompt_lens), figsize=(5.5 * len(prompt_lens), 4.2), squeeze=False)
    for ax, prompt_len in zip(axes[0], prompt_lens):
        for system in dict.fromkeys(p["system"] for p in result["points"]):
            series = sorted((p["concurrency"], p["output_tps"]) for p in result["points"]
                            if p["system"] == system and p["prompt_len"] == prompt_len and p.get("output_tps"))
            if series:
                ax.plot(*zip(*series), marker="o", label=SYSTEM_LABELS.get(system, system))
        ax.set(xscale="log", yscale="log", xlabel="concurrency", ylabel="output tokens/s",
               title=f"prompt {prompt_len} + output {result['config']['output_len']} tokens")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"gatemix bench serve, K = {result['num_experts']} experts")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
    serve.add_argument("--num-prompts", type=int, help="requests per point (default max(2*concurrency, 8))")
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
    from gatemix.cli import UserError

    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UserError(f"{flag} takes comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise UserError(f"{flag} takes positive integers, got {text!r}")
    return values


def config_from_args(args: argparse.Namespace) -> ServeBenchConfig:
    from gatemix.engine.composite_folder import CompositeInfo

    from gatemix.cli import UserError

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
            output_len=args.output_len, num_prompts=args.num_prompts,
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
