"""``gatemix bench draft``: how long the served ensemble's accepted runs behind a draft are, per domain.

``gatemix distill-report`` estimates a student's acceptance along held-out
text. What the engine accepts is a different quantity: the ensemble verifies
the draft along the text it generates itself, which for greedy decoding of a
small model is often far more repetitive, and so easier to predict, than the
held-out text. This bench measures it: greedy continuations of each domain's
eval-text openings through the composite behind the draft, with vLLM's own
per-request acceptance counts (``DraftAcceptance``), so the two figures can be
put side by side.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

from gatemix.config_cli import field_help
from gatemix.defaults import DEFAULT_PROJECT_DIR
from gatemix.engine.engine_config import build_offline_engine, stopping
from gatemix.server.choices import DraftAcceptance

logger = logging.getLogger(__name__)


@dataclass
class DraftBenchConfig:
    draft: str = field(default="", **field_help("the draft model folder (e.g. the distilled student)"))
    project: str = field(
        default=DEFAULT_PROJECT_DIR,
        **field_help("project file, or a folder holding gatemix.toml: its composite and eval text"))
    num_draft_tokens: int = field(default=3, **field_help("tokens the draft proposes per step (N)"))
    prompts_per_domain: int = field(default=16, **field_help("eval documents opened per domain"))
    prompt_len: int = field(default=32, **field_help("tokens of each document's opening"))
    output_len: int = field(default=96, **field_help("greedy tokens generated per prompt (EOS ignored)"))
    dtype: str = field(default="float32", **field_help("engine dtype"))
    json: str | None = field(default=None, **field_help("also write the results here"))

    def __post_init__(self) -> None:
        if not self.draft:
            raise ValueError("bench draft needs a draft: --draft <model folder>")
        if not 1 <= self.num_draft_tokens <= 16:
            raise ValueError("num_draft_tokens must be 1 to 16")
        if min(self.prompts_per_domain, self.prompt_len, self.output_len) < 1:
            raise ValueError("prompts_per_domain, prompt_len and output_len must be positive")


def eval_openings(project, tokenizer, count: int, length: int) -> dict[str, list[list[int]]]:
    """Domain -> the first ``length`` tokens of its first ``count`` eval documents that long."""
    openings = {}
    for domain in project.domains:
        ids = (tokenizer(text, add_special_tokens=False).input_ids for text in project.texts(domain, "eval"))
        openings[domain] = [tokens[:length] for tokens in ids if len(tokens) >= length][:count]
    return openings


def domain_acceptance(llm, prompts: dict[str, list[list[int]]], output_len: int) -> dict[str, dict]:
    """Per domain: verify steps, proposed and accepted draft tokens over greedy continuations, and
    the acceptance rate and mean acceptance length (1 + accepted per step, vLLM's figure)."""
    from vllm import SamplingParams  # vllm: deferred, `gatemix bench --help` imports this module

    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    result = {}
    for domain, openings in prompts.items():
        outputs = llm.generate([{"prompt_token_ids": p} for p in openings], params, use_tqdm=False)
        counts = [DraftAcceptance.of(output.outputs[0]) for output in outputs]
        if any(count is None for count in counts):
            raise RuntimeError("the engine reported no per-request acceptance: was it built with a draft?")
        total = sum(counts, DraftAcceptance(0, 0, 0))
        result[domain] = {"prompts": len(openings), **asdict(total), **total.figures()}
    return result


def run_draft_bench(config: DraftBenchConfig) -> dict:
    from transformers import AutoTokenizer

    from gatemix.engine.project_composite import ensure_composite
    from gatemix.project import load_project

    project = load_project(config.project)
    composite = ensure_composite(project).path
    tokenizer = AutoTokenizer.from_pretrained(project.tokenizer_dir)
    prompts = eval_openings(project, tokenizer, config.prompts_per_domain, config.prompt_len)
    with stopping(build_offline_engine(
            composite, dtype=config.dtype, max_model_len=config.prompt_len + config.output_len + 16,
            max_num_seqs=config.prompts_per_domain, draft=config.draft,
            num_draft_tokens=config.num_draft_tokens)) as llm:
        by_domain = domain_acceptance(llm, prompts, config.output_len)
    return {"config": asdict(config), "composite": str(composite), "domains": by_domain}


def format_draft_bench(result: dict) -> str:
    config = result["config"]
    lines = [(f"draft {config['draft']}, N = {config['num_draft_tokens']}, behind {result['composite']}: "
             f"greedy, {config['prompt_len']}-token eval openings, {config['output_len']} tokens each"),
             "", "| domain | prompts | acceptance rate | mean acceptance length |", "|---|---:|---:|---:|"]
    for domain, row in result["domains"].items():
        rate, length = row["acceptance_rate"], row["mean_acceptance_length"]
        lines.append(f"| {domain} | {row['prompts']} | {'n/a' if rate is None else f'{rate:.3f}'} "
                     f"| {'n/a' if length is None else f'{length:.2f}'} |")
    return "\n".join(lines)
