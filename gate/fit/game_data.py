"""What the primal-dual game is played on: the fit's per-sequence tensors and their scores.

Kept apart from the loop (``primal_dual.py``) because everything that builds a
fit (the project's features, the synthetic experiment, the gate family, the
report) needs the data type and the per-sequence scoring, but not the loop's
optimizer, checkpoints and duality-gap checks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from gatemix.gate.fit.losses import cross_entropy_loss, excess_loss
from gatemix.gate.mixing import mix_sequence_logprobs

SequenceLogprobFn = Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]


@dataclass
class GateFitData:
    """Per-sequence tensors, all indexed by sequence along dim 0.

    Always present: ``domain`` (N,) long, ``num_tokens`` (N,) float (scored
    tokens), ``expert_sequence_logprobs`` (N, K) float. Model inputs come next
    to them (``input_ids``/``attention_mask`` for the sequence gate,
    ``hidden``/``next_logprobs``/``token_mask`` for the causal router).
    """

    tensors: dict[str, torch.Tensor]
    num_domains: int
    fingerprint: str = ""  # identifies the data in checkpoints
    # Samples from q for the Z estimate: the model's inputs and ``expert_sequence_logprobs``.
    proposal: dict[str, torch.Tensor] | None = None

    def __post_init__(self) -> None:
        sizes = {name: tensor.shape[0] for name, tensor in self.tensors.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"fit tensors disagree on the number of sequences: {sizes}")
        if self.proposal is not None:
            proposal_sizes = {name: tensor.shape[0] for name, tensor in self.proposal.items()}
            if len(set(proposal_sizes.values())) != 1 or "expert_sequence_logprobs" not in self.proposal:
                raise ValueError(f"proposal tensors are inconsistent: {proposal_sizes}")
        counts = torch.bincount(self.tensors["domain"], minlength=self.num_domains)
        if len(counts) != self.num_domains or (counts == 0).any():
            raise ValueError(f"every domain needs sequences, got counts {counts.tolist()}")

    def select(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: tensor[indices] for name, tensor in self.tensors.items()}

    def domain_indices(self) -> list[torch.Tensor]:
        domain = self.tensors["domain"]
        return [torch.nonzero(domain == j).squeeze(1) for j in range(self.num_domains)]


def gated_sequence_logprobs(gate: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``log pi_g(x) = logsumexp_k(log g(x,k) + log pi_k(x))`` for the sequence gate. -> (B,)."""
    log_gate = gate(batch["input_ids"], batch["attention_mask"])  # (B, K)
    return mix_sequence_logprobs(batch["expert_sequence_logprobs"], log_gate)


def reference_logprobs(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The reference log-prob of each sequence. -> (B,).

    The in-domain expert's (expert j is domain j's), unless the data carries its
    own ``reference_logprobs`` (a sequence whose tokens come from several domains
    is scored against each token's own domain expert).
    """
    if "reference_logprobs" in batch:
        return batch["reference_logprobs"]
    return batch["expert_sequence_logprobs"].gather(1, batch["domain"].unsqueeze(1)).squeeze(1)


def per_sequence_loss(kind: str, model_logprobs: torch.Tensor, batch: dict) -> torch.Tensor:
    """The loss the game weighs per sequence, per token: ``excess`` or cross-entropy. -> (B,)."""
    if kind == "excess":
        return excess_loss(model_logprobs, reference_logprobs(batch), batch["num_tokens"])
    return cross_entropy_loss(model_logprobs, batch["num_tokens"])
