"""How good the student is as a speculative-decoding draft for the ensemble: pure functions.

In speculative sampling (Leviathan et al. 2023; Chen et al. 2023) a draft q
proposes a token y ~ q and the target p accepts it with probability
``min(1, p(y) / q(y))``; the chance that a proposal is accepted is

    alpha = sum_y min(p(y), q(y)) = 1 - TV(p, q).

Under greedy decoding the draft's token is accepted when both argmaxes agree.
One speculative step with N draft tokens yields the accepted prefix plus one
token from the target (the correction, or the bonus token when all N are
accepted), so with per-position acceptance ``a_t`` the expected tokens per step
starting at position t are

    L_t = 1 + sum_{j=1..N} prod_{i=0..j-1} a_{t+i},

vLLM's "mean acceptance length" (1 + accepted draft tokens per step).

What this approximates, plainly: the figures are computed teacher-forced along
held-out text, not along the text the served ensemble generates, and they
treat the acceptances of consecutive positions as independent, as Leviathan et
al. do. The real figure is the engine's: ``gatemix bench engine --draft``
reads vLLM's own acceptance counters.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def acceptance_probability(target_logprobs: torch.Tensor,
                           draft_logprobs: torch.Tensor) -> torch.Tensor:
    """``sum_y min(p, q)`` at temperature 1, from log-probs: ``(B, T, V), (B, T, V) -> (B, T)``.

    Taken in log space (min of the logs is the log of the min), so a token at
    -inf on either side adds nothing instead of a NaN.
    """
    overlap = torch.minimum(target_logprobs.float(), draft_logprobs.float())  # (B, T, V)
    return torch.logsumexp(overlap, dim=-1).exp().clamp(0.0, 1.0)  # (B, T)


def greedy_agreement(target_logprobs: torch.Tensor, draft_logprobs: torch.Tensor) -> torch.Tensor:
    """1.0 where both argmaxes agree, else 0.0: ``(B, T, V), (B, T, V) -> (B, T)``."""
    return (target_logprobs.argmax(-1) == draft_logprobs.argmax(-1)).float()


def expected_accept_lengths(acceptance: torch.Tensor, draft_tokens: int) -> torch.Tensor:
    """``L_t`` for every start t with ``t + N - 1 < T``: ``(B, T) -> (B, T - N + 1)``.

    ``acceptance`` holds per-position acceptance probabilities (or 0/1 greedy
    agreements); a step from t drafts positions t .. t + N - 1.
    """
    if draft_tokens < 1:
        raise ValueError(f"draft_tokens must be >= 1, got {draft_tokens}")
    if acceptance.shape[-1] < draft_tokens:
        return acceptance.new_zeros(acceptance.shape[:-1] + (0,))
    runs = acceptance.unfold(-1, draft_tokens, 1)  # (B, T - N + 1, N): a_t .. a_{t+N-1}
    return 1.0 + runs.cumprod(-1).sum(-1)  # (B, T - N + 1)


def mean_accept_length(acceptance: torch.Tensor, draft_tokens: int) -> float:
    """The mean of ``L_t`` over every start that fits: ``(B, T) -> float``."""
    return float(expected_accept_lengths(acceptance, draft_tokens).double().mean())


# What a tally sums per domain: the per-position figures and the per-step lengths.
FIGURES = ("acceptance", "greedy_agreement", "accept_length", "greedy_accept_length")


@dataclass
class AcceptanceTally:
    """Sums and counts per domain, so that per-domain means aggregate correctly over batches."""

    draft_tokens: int
    sums: dict[str, dict[str, float]] = field(default_factory=dict)  # domain -> figure -> sum
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # domain -> figure -> count

    def add(self, domain: str, target_logprobs: torch.Tensor,
            draft_logprobs: torch.Tensor) -> None:
        """One batch of one domain: ``(B, T, V)`` target and draft log-probs at the same positions."""
        alpha = acceptance_probability(target_logprobs, draft_logprobs)  # (B, T)
        greedy = greedy_agreement(target_logprobs, draft_logprobs)  # (B, T)
        values = {"acceptance": alpha, "greedy_agreement": greedy,
                  "accept_length": expected_accept_lengths(alpha, self.draft_tokens),
                  "greedy_accept_length": expected_accept_lengths(greedy, self.draft_tokens)}
        sums = self.sums.setdefault(domain, dict.fromkeys(FIGURES, 0.0))
        counts = self.counts.setdefault(domain, dict.fromkeys(FIGURES, 0))
        for name, value in values.items():
            sums[name] += float(value.double().sum())
            counts[name] += value.numel()

    def means(self) -> dict[str, dict[str, float]]:
        """Domain -> figure -> mean (NaN where no position counted, e.g. windows shorter than N)."""
        return {domain: {name: sums[name] / self.counts[domain][name]
                         if self.counts[domain][name] else float("nan") for name in FIGURES}
                for domain, sums in self.sums.items()}
