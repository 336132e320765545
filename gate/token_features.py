"""What the experts say about a batch of sequences: pure data, shared by the gates and the fit.

The registry's gates read it at evaluation time, the fit caches and trains on
it, and the distillation report scores with it; it holds tensors and knows how
to pick rows and concatenate, nothing more.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TokenFeatures:
    """What the experts say about a batch of sequences, aligned on the predicted token.

    Position t holds the prediction of token t+1 from tokens <= t:
    ``next_logprobs`` (N, T-1, K) = log pi_k(x_{t+1} | x_<=t), ``hidden``
    (N, T-1, K*H) = the K experts' final hidden states at t, concatenated in
    expert order (the router's input in the engine), ``token_mask`` (N, T-1).
    """

    input_ids: torch.Tensor  # (N, T)
    attention_mask: torch.Tensor  # (N, T)
    next_logprobs: torch.Tensor
    hidden: torch.Tensor | None
    token_mask: torch.Tensor

    def sequence_logprobs(self) -> torch.Tensor:
        """``log pi_k(x)`` of the scored tokens. -> (N, K)."""
        return (self.next_logprobs * self.token_mask.unsqueeze(-1)).sum(1)

    def num_tokens(self) -> torch.Tensor:
        return self.token_mask.sum(1).float()

    def select(self, indices: torch.Tensor) -> TokenFeatures:
        return TokenFeatures(
            self.input_ids[indices],
            self.attention_mask[indices],
            self.next_logprobs[indices],
            None if self.hidden is None else self.hidden[indices],
            self.token_mask[indices],
        )

    @staticmethod
    def concat(parts: list[TokenFeatures]) -> TokenFeatures:
        width = max(part.input_ids.shape[1] for part in parts)
        return TokenFeatures(
            torch.cat([_pad_positions(p.input_ids, width) for p in parts]),
            torch.cat([_pad_positions(p.attention_mask, width) for p in parts]),
            torch.cat([_pad_positions(p.next_logprobs, width - 1) for p in parts]),
            None
            if parts[0].hidden is None
            else torch.cat([_pad_positions(p.hidden, width - 1) for p in parts]),
            torch.cat([_pad_positions(p.token_mask, width - 1) for p in parts]),
        )


def _pad_positions(tensor: torch.Tensor, length: int) -> torch.Tensor:
    """Zeros appended along dim 1 up to ``length``: ``(N, T, ...) -> (N, length, ...)``."""
    extra = length - tensor.shape[1]
    if extra == 0:
        return tensor
    shape = (tensor.shape[0], extra, *tensor.shape[2:])
    return torch.cat([tensor, tensor.new_zeros(shape)], dim=1)
