"""Sequences drawn from the robust gated model ``pi_g``, for the router's fit.

``pi_g`` reads the whole sequence, so it cannot generate token by token. We
sample sequences from it exactly, using the proposal ``q = (1/K) sum_k pi_k``
(pick an expert uniformly, let it generate), and

- rejection: accept x with probability ``pi_g(x) / (K q(x))``, which is at most
  1 because ``pi_g <= K q`` for any gate on the simplex (acceptance about 1/K);
- SIR: draw ``oversample`` times more proposals and resample them in
  proportion to ``pi_g(x) / q(x)`` (no rejection loop, slightly biased for small pools).
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from gatemix.gate.fit.expert_bank import ExpertBank
from gatemix.gate.fit.losses import importance_log_ratios
from gatemix.gate.mixing import mix_sequence_logprobs
from gatemix.gate.token_features import TokenFeatures

logger = logging.getLogger(__name__)


@torch.no_grad()
def draw_from_q(
    bank: ExpertBank, count: int, length: int, generator: torch.Generator, batch_size: int
) -> TokenFeatures:
    """``count`` draws from q: an expert chosen uniformly, then its own sample (with hidden states)."""
    choices = torch.randint(bank.num_experts, (count,), generator=generator)
    parts = []
    for expert in range(bank.num_experts):
        remaining = int((choices == expert).sum())
        while remaining > 0:
            num = min(batch_size, remaining)
            input_ids, attention_mask = bank.sample(expert, num, length, generator)
            parts.append(bank.score(input_ids, attention_mask, with_hidden=True))
            remaining -= num
    return TokenFeatures.concat(parts)


@torch.no_grad()
def gate_log_ratios(gate: nn.Module, features: TokenFeatures) -> torch.Tensor:
    """``log pi_g(x)/q(x)`` of scored sequences under the sequence gate. -> (N,)."""
    expert_logprobs = features.sequence_logprobs()
    log_gate = gate(features.input_ids, features.attention_mask)
    return importance_log_ratios(mix_sequence_logprobs(expert_logprobs, log_gate), expert_logprobs)


@torch.no_grad()
def sample_robust_model(
    bank: ExpertBank,
    gate: nn.Module,
    num_samples: int,
    length: int,
    *,
    method: str = "rejection",
    oversample: int = 4,
    seed: int = 0,
    batch_size: int = 64,
    max_rounds: int = 50,
    proposals: TokenFeatures | None = None,
) -> tuple[TokenFeatures, dict]:
    """Exact (rejection) or SIR samples from ``pi_g``, with their expert features.

    SIR resamples ``proposals`` (draws from q already scored, such as the pool
    the primal-dual loop used for Z) when given, else draws its own.
    """
    generator = torch.Generator().manual_seed(seed)
    gate.eval()
    if method == "sir":
        if proposals is None:
            proposals = draw_from_q(bank, num_samples * oversample, length, generator, batch_size)
        return _resample(gate, proposals, num_samples, generator)
    if method != "rejection":
        raise ValueError(f"unknown sampler {method!r}")
    return _rejection_sample(bank, gate, num_samples, length, generator, batch_size, max_rounds)


def _resample(
    gate: nn.Module, proposals: TokenFeatures, num_samples: int, generator: torch.Generator
) -> tuple[TokenFeatures, dict]:
    """SIR: ``num_samples`` of the proposals, drawn in proportion to ``pi_g / q``."""
    probs = torch.softmax(gate_log_ratios(gate, proposals).double(), 0)
    picked = torch.multinomial(probs, num_samples, replacement=True, generator=generator)
    ess = float(1.0 / (probs**2).sum())
    return proposals.select(picked), {"method": "sir", "proposals": len(probs), "ess": ess}


def _rejection_sample(
    bank: ExpertBank,
    gate: nn.Module,
    num_samples: int,
    length: int,
    generator: torch.Generator,
    batch_size: int,
    max_rounds: int,
) -> tuple[TokenFeatures, dict]:
    """Rounds of ``num_samples`` draws from q, each kept with probability ``pi_g / (K q)``."""
    kept, proposed = [], 0
    for _ in range(max_rounds):
        proposals = draw_from_q(bank, num_samples, length, generator, batch_size)
        accept_log_prob = gate_log_ratios(gate, proposals) - math.log(bank.num_experts)
        uniform = torch.rand(accept_log_prob.shape, generator=generator, dtype=torch.float64)
        accepted = torch.nonzero(uniform.log() < accept_log_prob.double()).squeeze(1)
        kept.append(proposals.select(accepted))
        proposed += num_samples
        if sum(part.input_ids.shape[0] for part in kept) >= num_samples:
            break
    samples = TokenFeatures.concat(kept)
    accepted_count = samples.input_ids.shape[0]
    if accepted_count < num_samples:
        logger.warning("rejection sampling kept %s of %s samples", accepted_count, num_samples)
    samples = samples.select(torch.arange(min(num_samples, accepted_count)))
    return samples, {
        "method": "rejection",
        "proposals": proposed,
        "acceptance": accepted_count / proposed,
    }
