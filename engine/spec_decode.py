"""What the composite needs from vLLM's speculative decoding (``--draft``): its gate table kept.

vLLM 0.32 builds no installed logits processors when a draft is configured
(``build_logitsprocs`` returns MinTokens alone, and refuses processors named
explicitly), because a processor that edits logits would see the bonus rows only,
never the verified draft rows. gatemix's ``RequestGateProcessor`` edits nothing:
it is the only channel through which the worker learns which request sits in
which batch row (pins, subsets, gate versions, trace addresses, the posterior
state's lifetime). ``keep_request_gates_with_drafts`` wraps the runner's
``build_logitsprocs`` so that, for the composite, it is built with a draft too.
Its ``apply`` sees the bonus rows (one per request), which it does not read:
the composite exports the trace from ``compute_logits`` (``request_gates``).

Installed by the plugin in every vLLM process; a contract test pins the names.

``check_draft`` refuses, in one line, a draft that cannot be exact: vLLM would map
another tokenizer's ids through their shared strings (``use_heterogeneous_vocab``),
which changes what a token is; gatemix asks for the experts' own tokenizer.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

from gatemix.engine.composite_folder import (
    expert_config_dir,
    is_composite_architecture,
    is_composite_folder,
)
from gatemix.errors import UserError

logger = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"

# Measured: 1,200 samples of two tokens at temperature 1 from one plain expert with another as
# its draft put tokens the target gives p < 1e-4 among the most frequent (tests/engine/
# test_spec_decode.py holds the composite to the same chi-square test, as a strict xfail on CPU).
CPU_SAMPLING_WITH_DRAFT = (
    "sampling (temperature > 0) with a draft model is not exact on vLLM 0.32's CPU backend: its "
    "rejection sampler draws tokens the model gives almost no probability; send temperature 0, or "
    "serve without --draft"
)


def speculative_config(draft: str | Path, num_draft_tokens: int) -> dict:
    """vLLM's ``speculative_config`` for a separate draft model (its V1 ``draft_model`` proposer)."""
    return {"method": "draft_model", "model": str(draft), "num_speculative_tokens": num_draft_tokens}


def _vocab_size(model_dir: Path) -> int | None:
    config = json.loads((model_dir / "config.json").read_text())
    if "vocab_size" not in config and is_composite_folder(model_dir):
        config = json.loads((expert_config_dir(model_dir, 0) / "config.json").read_text())
    return config.get("vocab_size")


def _tokens(model_dir: Path) -> tuple | None:
    """What makes a tokenizer's ids mean what they mean: its model's vocabulary and its added tokens."""
    path = model_dir / TOKENIZER_FILE
    if not path.is_file():
        return None
    tokenizer = json.loads(path.read_text())
    return json.dumps(tokenizer.get("model"), sort_keys=True), json.dumps(tokenizer.get("added_tokens"), sort_keys=True)


def check_draft(model_dir: str | Path, draft: str | Path) -> None:
    """One-line refusals of a draft the engine could not verify exactly with (``UserError``)."""
    model_dir, draft = Path(model_dir), Path(draft)
    if not (draft / "config.json").is_file():
        raise UserError(f"--draft {draft}: not a model folder (no config.json)")
    if is_composite_folder(draft):
        raise UserError(f"--draft {draft}: a composite cannot be a draft; name one small model")
    target_vocab, draft_vocab = _vocab_size(model_dir), _vocab_size(draft)
    if target_vocab != draft_vocab:
        raise UserError(
            f"--draft {draft}: vocabulary of {draft_vocab} tokens, the experts have {target_vocab}; "
            "a draft must share the experts' tokenizer"
        )
    target_tokens, draft_tokens = _tokens(model_dir), _tokens(draft)
    if draft_tokens is None:
        logger.warning("--draft %s has no %s: assuming the experts' tokenizer", draft, TOKENIZER_FILE)
    elif draft_tokens != target_tokens:
        raise UserError(f"--draft {draft}: its tokenizer differs from the experts'; a draft must share it")


def _is_composite(vllm_config) -> bool:
    architectures = getattr(vllm_config.model_config.hf_config, "architectures", None) or []
    return is_composite_architecture(architectures)


def keep_request_gates_with_drafts() -> None:
    """Wrap ``build_logitsprocs`` where the model runner finds it; idempotent.

    The runner module binds the name at its import: patched there if it is
    imported already, and at the source for a later import (importing the runner
    here would cost every process that loads plugins seconds).
    """
    import sys

    from vllm.v1.sample import logits_processor

    runner = sys.modules.get("vllm.v1.worker.gpu_model_runner")
    for module in (logits_processor, runner):
        if module is not None and not getattr(module.build_logitsprocs, "gatemix_keeps_request_gates", False):
            module.build_logitsprocs = _keeping_request_gates(module.build_logitsprocs)


def _keeping_request_gates(original):
    from vllm.v1.sample.logits_processor import LogitsProcessors

    @functools.wraps(original)
    def build_logitsprocs(vllm_config, device, is_pin_memory, is_pooling_model, custom_logitsprocs=()):
        processors = original(vllm_config, device, is_pin_memory, is_pooling_model, custom_logitsprocs)
        if vllm_config.speculative_config is None or is_pooling_model or not _is_composite(vllm_config):
            return processors
        from gatemix.engine.request_gates import RequestGateProcessor  # deferred: it imports vllm

        return LogitsProcessors([*processors.all, RequestGateProcessor(vllm_config, device, is_pin_memory)])

    build_logitsprocs.gatemix_keeps_request_gates = True
    return build_logitsprocs
