"""Evaluation text beyond single-domain documents: text that switches domain, and text from none.

Users do not send one domain's documents only. Two more kinds of text:

- **switching documents**: one sequence made of chunks of 2-3 domains in a
  random order (seeded), each chunk a window of that domain's eval text. Each
  token keeps the domain it came from, so the sequence can also be scored
  against its per-segment oracle (every token's own domain expert);
- **out-of-domain text**: a project's ``[out_of_domain]`` documents, text no
  expert trained on (the demo's: Debian changelogs), scored as they are.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from gatemix.gate.token_features import TokenFeatures


@dataclass
class SwitchingSet:
    """Token lists led by the start token, and each scored token's domain index."""

    token_lists: list[list[int]]
    segment_domains: list[list[int]]  # per sequence: the domain of tokens 1..T-1 (what is predicted)

    def domain_mask(self, width: int) -> torch.Tensor:
        """``(N, width)`` domain index of each predicted position, -1 past the end."""
        out = torch.full((len(self.segment_domains), width), -1, dtype=torch.long)
        for row, domains in enumerate(self.segment_domains):
            out[row, : len(domains)] = torch.tensor(domains[:width])
        return out


def chunk_sizes(total: int, parts: int, rng: random.Random) -> list[int]:
    """``parts`` positive sizes summing to ``total``, each between half and 1.5 times the mean."""
    weights = [rng.uniform(0.5, 1.5) for _ in range(parts)]
    sizes = [max(1, int(total * w / sum(weights))) for w in weights]
    sizes[-1] = max(1, total - sum(sizes[:-1]))
    return sizes


def switching_sequences(
    domain_streams: list[list[int]],
    *,
    count: int,
    length: int,
    seed: int,
    start_token: int,
    max_domains: int = 3,
) -> SwitchingSet:
    """``count`` sequences of ``length`` tokens from 2..``max_domains`` domains' token streams.

    ``domain_streams[j]`` is domain j's text as one token stream (its documents
    joined); every chunk is a window of it at a seeded offset. Deterministic in
    ``seed``; the domains of one sequence are distinct and in a random order.
    """
    usable = [j for j, stream in enumerate(domain_streams) if len(stream) >= 2]
    if len(usable) < 2:
        raise ValueError("switching documents need text of at least two domains")
    rng = random.Random(f"switching/{seed}")
    token_lists, segment_domains = [], []
    for _ in range(count):
        parts = rng.randint(2, min(max_domains, len(usable)))
        domains = rng.sample(usable, parts)
        ids, labels = [start_token], []
        for domain, size in zip(domains, chunk_sizes(length - 1, parts, rng)):
            stream = domain_streams[domain]
            size = min(size, len(stream))
            offset = rng.randrange(0, len(stream) - size + 1)
            ids += stream[offset : offset + size]
            labels += [domain] * size
        token_lists.append(ids)
        segment_domains.append(labels)
    return SwitchingSet(token_lists, segment_domains)


def segment_oracle_logprobs(features: TokenFeatures, switching: SwitchingSet) -> torch.Tensor:
    """Each token scored by its own segment's expert: the per-segment oracle. -> ``(N, T-1)``."""
    domains = switching.domain_mask(features.next_logprobs.shape[1])
    picked = features.next_logprobs.gather(-1, domains.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return picked * features.token_mask * (domains >= 0)
