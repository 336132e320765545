"""``gatemix bench engine``, ``gatemix bench mixing`` and ``gatemix bench serve``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gatemix.errors import UserError


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="side-by-side speed benchmarks (ratios from one run)")
    benches = parser.add_subparsers(dest="bench", required=True, metavar="BENCH")
    engine = benches.add_parser("engine", help="fused ensemble vs one expert vs a naive transformers ensemble")
    engine.add_argument("--composite", help="composite folder (default: <demo-dir>/composite)")
    engine.add_argument("--expert", help="single-expert folder (default: the composite's first expert in <demo-dir>)")
    engine.add_argument("--demo-dir", default="artifacts/demo", help="demo build folder")
    engine.add_argument("--concurrency", default="1,16", help="comma-separated concurrencies")
    engine.add_argument("--output-len", type=int, default=128)
    engine.add_argument("--prompt-len", type=int, default=32)
    engine.add_argument("--dtype", default="float32")
    engine.add_argument("--compile", action="store_true", help="let vLLM torch.compile the models")
    engine.add_argument("--json", help="also write the results here")
    engine.set_defaults(run=run_engine)
    mixing = benches.add_parser("mixing", help="the mixing step alone: fused vs two-pass log-softmax")
    mixing.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    mixing.add_argument("--device", default="cpu")
    mixing.add_argument("--repeats", type=int, default=20, help="calls per timing")
    mixing.add_argument("--json", help="also write the results here")
    mixing.set_defaults(run=run_mixing)
    try:
        from gatemix.bench.serve_bench import add_serve_bench_parser
    except ImportError:
        return
    add_serve_bench_parser(benches)


def run_mixing(args: argparse.Namespace) -> int:
    import torch
    from gatemix.bench.mixing_bench import format_mixing_bench, run_mixing_bench

    if args.repeats < 1:
        raise UserError("--repeats must be at least 1")
    rows = run_mixing_bench(dtype=getattr(torch, args.dtype), device=args.device, repeats=args.repeats)
    print(format_mixing_bench(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


def _demo_models(demo_dir: Path) -> tuple[Path, list[Path]]:
    from gatemix.engine.composite_folder import CompositeInfo

    composite = demo_dir / "composite"
    if not composite.is_dir():
        raise UserError(f"{composite} not found: run `gatemix build-demo --out {demo_dir}` first")
    info = CompositeInfo.read(composite)
    return composite, [demo_dir / "experts" / name for name in info.expert_names]


def run_engine(args: argparse.Namespace) -> int:
    from gatemix.bench.engine_bench import EngineBenchConfig, format_engine_bench, run_engine_bench

    composite, expert_dirs = _demo_models(Path(args.demo_dir)) if not args.composite else (Path(args.composite), [])
    if args.composite:
        from gatemix.engine.composite_folder import CompositeInfo

        names = CompositeInfo.read(composite).expert_names
        expert_dirs = [Path(args.demo_dir) / "experts" / name for name in names]
    expert = Path(args.expert) if args.expert else expert_dirs[0]
    missing = [str(p) for p in [expert, *expert_dirs] if not p.is_dir()]
    if missing:
        raise UserError(f"expert folders not found: {', '.join(missing)} (pass --expert / --demo-dir)")
    config = EngineBenchConfig(
        composite_dir=str(composite),
        expert_dir=str(expert),
        concurrencies=tuple(int(c) for c in args.concurrency.split(",")),
        prompt_len=args.prompt_len,
        output_len=args.output_len,
        dtype=args.dtype,
        enforce_eager=not args.compile,
    )
    result = run_engine_bench(config, [str(p) for p in expert_dirs])
    print(format_engine_bench(result, config))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0
