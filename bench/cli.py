"""``gatemix bench engine``, ``gatemix bench mixing`` and ``gatemix bench serve``.

Each bench's flags come from its config dataclass (:mod:`gatemix.config_cli`).
The models come from the project file or are K random-init experts
(:mod:`gatemix.bench.models`).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from gatemix.config_cli import add_config_flags, config_from_args

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------- the parsers
def add_parser(subparsers) -> None:
    # The benches' modules import torch: deferred so that other commands' --help stays fast.
    from gatemix.bench.engine_bench import EngineBenchConfig
    from gatemix.bench.mixing_bench import MixingBenchConfig
    from gatemix.bench.models import RandomExpertsConfig

    parser = subparsers.add_parser("bench", help="side-by-side speed benchmarks (ratios from one run)")
    benches = parser.add_subparsers(dest="bench", required=True, metavar="BENCH")
    engine = benches.add_parser(
        "engine", help="fused ensemble vs one expert vs a naive transformers ensemble",
        description="Decode tokens/s of the fused ensemble (the composite in vLLM), one expert "
        "alone in vLLM and a naive transformers loop, and E = K*tps(ensemble)/tps(single). "
        "The experts are the project's, or K random-init ones of any size (--random-experts).",
    )
    add_config_flags(engine, EngineBenchConfig, skip=("random",))
    random_group = engine.add_argument_group(
        "random experts", "bench K random-init experts of this shape instead of the project's "
        "(written once under --random-cache-dir, packed with a uniform gate)")
    add_config_flags(random_group, RandomExpertsConfig)
    engine.set_defaults(run=run_engine)
    from gatemix.bench.prefix_bench import PrefixBenchConfig

    prefix = benches.add_parser("prefix", help="time to first token on prompts sharing a long prefix, caching on/off")
    add_config_flags(prefix, PrefixBenchConfig, skip=("random",))
    prefix_random = prefix.add_argument_group("random experts")
    add_config_flags(prefix_random, RandomExpertsConfig)
    prefix.set_defaults(run=run_prefix)
    from gatemix.bench.prefill_bench import PrefillBenchConfig

    prefill = benches.add_parser("prefill", help="a long prompt's prefill, uniform vs posterior gate: time and memory")
    add_config_flags(prefill, PrefillBenchConfig, skip=("random",))
    prefill_random = prefill.add_argument_group("random experts")
    add_config_flags(prefill_random, RandomExpertsConfig)
    prefill.set_defaults(run=run_prefill)
    mixing = benches.add_parser("mixing", help="the mixing step alone: fused vs two-pass log-softmax")
    add_config_flags(mixing, MixingBenchConfig)
    mixing.set_defaults(run=run_mixing)
    try:
        from gatemix.bench.serve_bench import add_serve_bench_parser
    except ImportError:  # the serve bench's HTTP and process tools are not installed
        return
    add_serve_bench_parser(benches)


def run_mixing(args: argparse.Namespace) -> int:
    from gatemix.bench.mixing_bench import MixingBenchConfig, format_mixing_bench, run_mixing_bench

    config = config_from_args(args, MixingBenchConfig)
    rows = run_mixing_bench(dtype=config.torch_dtype, device=config.device, repeats=config.repeats,
                            rounds=config.rounds, seed=config.seed)
    print(format_mixing_bench(rows))
    if config.json:
        Path(config.json).write_text(json.dumps(rows, indent=2))
    return 0


def _models(config, random):
    from gatemix.bench.models import project_models, random_models

    if random.random_experts:
        return random_models(random)
    return project_models(config.project, composite=getattr(config, "composite", None),
                          expert=getattr(config, "expert", None))[1]


def run_prefix(args: argparse.Namespace) -> int:
    from gatemix.bench.models import RandomExpertsConfig, check_context
    from gatemix.bench.prefix_bench import PrefixBenchConfig, format_prefix_bench, run_prefix_bench

    random = config_from_args(args, RandomExpertsConfig)
    config = config_from_args(args, PrefixBenchConfig, random=random)
    models = _models(config, random)
    check_context(models, config.prefix_len + config.tail_len + config.output_len)
    result = run_prefix_bench(config, models)
    print(format_prefix_bench(result))
    if config.json:
        Path(config.json).write_text(json.dumps(result, indent=2))
    return 0


def run_prefill(args: argparse.Namespace) -> int:
    from gatemix.bench.models import RandomExpertsConfig, check_context
    from gatemix.bench.prefill_bench import (
        PrefillBenchConfig,
        format_prefill_bench,
        run_prefill_bench,
    )

    random = config_from_args(args, RandomExpertsConfig)
    config = config_from_args(args, PrefillBenchConfig, random=random)
    models = _models(config, random)
    check_context(models, config.prompt_len + 1)
    result = run_prefill_bench(config, models)
    print(format_prefill_bench(result))
    if config.json:
        Path(config.json).write_text(json.dumps(result, indent=2))
    return 0


def run_engine(args: argparse.Namespace) -> int:
    from gatemix.bench.engine_bench import EngineBenchConfig, format_engine_bench, run_engine_bench
    from gatemix.bench.models import RandomExpertsConfig, check_context

    random = config_from_args(args, RandomExpertsConfig)
    config = config_from_args(args, EngineBenchConfig, random=random)
    models = _models(config, random)
    check_context(models, config.max_model_len)
    result = run_engine_bench(config, models)
    print(format_engine_bench(result, config))
    if config.json:
        Path(config.json).write_text(json.dumps(result, indent=2))
    return 0
