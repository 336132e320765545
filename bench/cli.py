"""``gatemix bench engine``, ``mixing``, ``prefix``, ``prefill``, ``draft``, ``lora`` and ``serve``.

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
    from gatemix.bench.draft_bench import DraftBenchConfig
    from gatemix.bench.engine_bench import EngineBenchConfig
    from gatemix.bench.lora_bench import LoRABenchConfig
    from gatemix.bench.mixing_bench import MixingBenchConfig
    from gatemix.bench.prefill_bench import PrefillBenchConfig
    from gatemix.bench.prefix_bench import PrefixBenchConfig

    parser = subparsers.add_parser("bench", help="side-by-side speed benchmarks (ratios from one run)")
    benches = parser.add_subparsers(dest="bench", required=True, metavar="BENCH")
    _add_model_bench(
        benches, "engine", EngineBenchConfig, run_engine,
        help="fused ensemble vs one expert vs a naive transformers ensemble",
        description="Decode tokens/s of the fused ensemble (the composite in vLLM), one expert "
        "alone in vLLM and a naive transformers loop, and E = K*tps(ensemble)/tps(single). "
        "The experts are the project's, or K random-init ones of any size (--random-experts).",
    )
    _add_model_bench(benches, "prefix", PrefixBenchConfig, run_prefix,
                     help="time to first token on prompts sharing a long prefix, caching on/off")
    _add_model_bench(benches, "prefill", PrefillBenchConfig, run_prefill,
                     help="a long prompt's prefill, uniform vs posterior gate: time and memory")
    draft = benches.add_parser(
        "draft", help="acceptance behind a draft, per domain, measured by the engine",
        description="Greedy continuations of each domain's eval-text openings through the project's "
        "composite behind --draft: vLLM's acceptance rate and mean acceptance length per domain, to "
        "set beside distill-report's estimate along held-out text.")
    add_config_flags(draft, DraftBenchConfig)
    draft.set_defaults(run=run_draft)
    mixing = benches.add_parser("mixing", help="the mixing step alone: fused vs two-pass log-softmax")
    add_config_flags(mixing, MixingBenchConfig)
    mixing.set_defaults(run=run_mixing)
    lora = benches.add_parser(
        "lora", help="K LoRA experts of one base vs the same adapters merged into K full experts",
        description="A random base, K random LoRA adapters and the same adapters merged into full "
        "experts (written once under --cache-dir), packed as a LoRA composite and as a composite of "
        "full experts, then side by side in one run: weight bytes (on disk, in the engine, read per "
        "decode step), each engine's peak resident memory, decode tokens/s in paired rounds.")
    add_config_flags(lora, LoRABenchConfig)
    lora.set_defaults(run=run_lora)
    try:
        from gatemix.bench.serve_bench import add_serve_bench_parser
    except ImportError:  # the serve bench's HTTP and process tools are not installed
        return
    add_serve_bench_parser(benches)


def _add_model_bench(benches, name: str, config_cls, run, **parser_kwargs) -> None:
    """A bench over the project's experts or random ones: its own flags, then the random experts' group."""
    from gatemix.bench.models import RandomExpertsConfig

    bench = benches.add_parser(name, **parser_kwargs)
    add_config_flags(bench, config_cls, skip=("random",))
    random_group = bench.add_argument_group(
        "random experts", "bench K random-init experts of this shape instead of the project's "
        "(written once under --random-cache-dir, packed with a uniform gate)")
    add_config_flags(random_group, RandomExpertsConfig)
    bench.set_defaults(run=run)


def _report(text: str, result, json_path: str | None) -> int:
    """Print a bench's table and, with ``--json``, write its result; the command's exit status."""
    print(text)
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2))
    return 0


def run_draft(args: argparse.Namespace) -> int:
    from gatemix.bench.draft_bench import DraftBenchConfig, format_draft_bench, run_draft_bench

    config = config_from_args(args, DraftBenchConfig)
    result = run_draft_bench(config)
    return _report(format_draft_bench(result), result, config.json)


def run_mixing(args: argparse.Namespace) -> int:
    from gatemix.bench.mixing_bench import MixingBenchConfig, format_mixing_bench, run_mixing_bench

    config = config_from_args(args, MixingBenchConfig)
    rows = run_mixing_bench(dtype=config.torch_dtype, device=config.device, repeats=config.repeats,
                            rounds=config.rounds, seed=config.seed)
    return _report(format_mixing_bench(rows), rows, config.json)


def run_lora(args: argparse.Namespace) -> int:
    from gatemix.bench.lora_bench import LoRABenchConfig, format_lora_bench, run_lora_bench

    config = config_from_args(args, LoRABenchConfig)
    result = run_lora_bench(config)
    return _report(format_lora_bench(result), result, config.json)


def _run_model_bench(args: argparse.Namespace, config_cls, context_tokens, run_bench, format_result) -> int:
    """Models (the project's or random), the context check, the report and its JSON, for any model bench."""
    from gatemix.bench.models import (
        RandomExpertsConfig,
        check_context,
        project_models,
        random_models,
    )

    random = config_from_args(args, RandomExpertsConfig)
    config = config_from_args(args, config_cls, random=random)
    if random.random_experts:
        models = random_models(random)
    else:
        models = project_models(config.project, composite=getattr(config, "composite", None),
                                expert=getattr(config, "expert", None))[1]
    check_context(models, context_tokens(config))
    result = run_bench(config, models)
    return _report(format_result(result, config), result, config.json)


def run_prefix(args: argparse.Namespace) -> int:
    from gatemix.bench.prefix_bench import PrefixBenchConfig, format_prefix_bench, run_prefix_bench

    return _run_model_bench(
        args, PrefixBenchConfig, lambda config: config.prefix_len + config.tail_len + config.output_len,
        run_prefix_bench, lambda result, _config: format_prefix_bench(result),
    )


def run_prefill(args: argparse.Namespace) -> int:
    from gatemix.bench.prefill_bench import (
        PrefillBenchConfig,
        format_prefill_bench,
        run_prefill_bench,
    )

    return _run_model_bench(
        args, PrefillBenchConfig, lambda config: config.prompt_len + 1,
        run_prefill_bench, lambda result, _config: format_prefill_bench(result),
    )


def run_engine(args: argparse.Namespace) -> int:
    from gatemix.bench.engine_bench import EngineBenchConfig, format_engine_bench, run_engine_bench

    return _run_model_bench(
        args, EngineBenchConfig, lambda config: config.max_model_len, run_engine_bench, format_engine_bench,
    )
