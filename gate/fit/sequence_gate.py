"""The sequence-level gate ``g_theta(x, .)``: a small bidirectional transformer over token ids.

It reads the whole sequence, so it is not causal and cannot serve token by
token; it is the first stage of the paper's route, and the causal router the
engine runs is fitted to it afterwards (``router_fit.py``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class SequenceGateForm:
    vocab_size: int
    num_experts: int
    width: int = 64
    num_layers: int = 2
    num_heads: int = 4
    max_length: int = 512
    pooling: str = "mean"  # "mean" over the valid tokens, or the "last" valid token

    def __post_init__(self) -> None:
        if min(self.vocab_size, self.num_experts, self.width, self.num_heads, self.max_length) < 1:
            raise ValueError(f"invalid sequence gate form {self}")
        if self.num_layers < 0 or self.width % self.num_heads:
            raise ValueError(f"width must be a multiple of num_heads in {self}")
        if self.pooling not in ("mean", "last"):
            raise ValueError(f"pooling must be 'mean' or 'last', got {self.pooling!r}")

    def to_dict(self) -> dict:
        return asdict(self)


class SequenceGate(nn.Module):
    """``(B, T)`` token ids and ``(B, T)`` mask -> ``(B, K)`` normalized log gate weights."""

    def __init__(self, form: SequenceGateForm) -> None:
        super().__init__()
        self.form = form
        self.token_embedding = nn.Embedding(form.vocab_size, form.width)
        self.position_embedding = nn.Embedding(form.max_length, form.width)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                d_model=form.width,
                nhead=form.num_heads,
                dim_feedforward=4 * form.width,
                dropout=0.0,
                batch_first=True,
                norm_first=True,
            )
            for _ in range(form.num_layers)
        )
        self.norm = nn.LayerNorm(form.width)
        self.head = nn.Linear(form.width, form.num_experts)
        # Start at the uniform gate: the primal-dual loop then moves away from a
        # feasible point (Z_g = 1 for a constant gate) rather than a random one.
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        input_ids = input_ids[:, : self.form.max_length]
        valid = attention_mask[:, : self.form.max_length].bool()  # (B, T)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        hidden = self.token_embedding(input_ids) + self.position_embedding(positions)  # (B, T, W)
        for layer in self.layers:
            hidden = layer(hidden, src_key_padding_mask=~valid)
        hidden = self.norm(hidden)
        if self.form.pooling == "mean":
            weights = valid.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1)  # (B, W)
        else:
            last = valid.long().sum(1).clamp_min(1) - 1
            pooled = hidden[torch.arange(hidden.shape[0]), last]
        return torch.log_softmax(self.head(pooled).float(), dim=-1)  # (B, K)

    def num_parameters(self) -> int:
        return sum(param.numel() for param in self.parameters())
