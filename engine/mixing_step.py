"""The composite's mixing step: two-pass eager by default, the fused form compiled on request."""

from __future__ import annotations

import logging

import torch

from gatemix.gate.mixing import mix_logits, mix_logits_two_pass

logger = logging.getLogger(__name__)


class MixingStep:
    """``(N, K, V)`` expert logits, ``(N, K)`` log weights -> ``(N, V)`` mixture log-probs.

    In eager PyTorch the fused form (no K x V log-softmax) is no faster than
    log-softmax-then-mix on CPU (``logsumexp`` is several kernels,
    ``log_softmax`` one), so eager mixing stays two-pass. Compiled
    (``GATEMIX_COMPILE_MIXING=1``) the fused form is faster, but mixing is a
    small part of a step at small vocabularies, so it is opt-in (the README's
    benchmark section has the figures). It compiles on the first call (vLLM's
    warm-up run) and falls back to eager, logging once, if compiling fails (no
    C++ compiler or Triton).
    """

    def __init__(self, compiled: bool = False) -> None:
        self.compiled = torch.compile(mix_logits, dynamic=True) if compiled else None

    def __call__(self, expert_logits: torch.Tensor, log_weights: torch.Tensor) -> torch.Tensor:
        if self.compiled is not None:
            try:
                return self.compiled(expert_logits, log_weights)
            except Exception as exc:  # noqa: BLE001 inductor needs a C++ compiler (CPU) or Triton (GPU)
                logger.warning("compiled mixing failed (%s); mixing eagerly from now on", exc)
                self.compiled = None
        return mix_logits_two_pass(expert_logits, log_weights)
