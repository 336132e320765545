"""Synthetic token features of two domains and two experts, for the gate tests."""

from __future__ import annotations

import torch

from gatemix.gate.token_features import TokenFeatures

HIDDEN = 4  # each expert's hidden width


def two_domain_features(index: int, sequences: int, length: int, seed: int, *, gap: float) -> TokenFeatures:
    """Expert ``index`` is sharp on this domain, the other ``gap`` nats worse per token.

    The hidden state says which domain a token is in, so a learned router can route.
    """
    generator = torch.Generator().manual_seed(seed)
    good = -1.0 - 0.1 * torch.rand(sequences, length, generator=generator)
    bad = good - gap
    next_logprobs = torch.stack([good, bad] if index == 0 else [bad, good], -1)  # (N, T, 2)
    hidden = torch.zeros(sequences, length, 2 * HIDDEN)
    hidden[..., index] = 1.0
    hidden += 0.05 * torch.randn(hidden.shape, generator=generator)
    input_ids = torch.ones(sequences, length + 1, dtype=torch.long)
    return TokenFeatures(
        input_ids, torch.ones_like(input_ids), next_logprobs, hidden, torch.ones(sequences, length)
    )
