"""The causal router gamma_phi(x_<t) that the engine runs at every token.

Its form is a head on the K experts' final hidden states at position t. Those
states are causal (they see x_<=t), are already computed by the engine for the
experts' own logits, and are cached through the experts' KV caches, so the
router costs one small matmul per token and no attention of its own.

A fixed weight vector is the same module with a zero weight and ``bias = log w``,
so the engine has one gate code path for "fixed", "uniform" and "learned".
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class RouterForm:
    """Architecture of the router; stored in the artifact so the engine can rebuild it."""

    num_experts: int
    hidden_size: int  # each expert's final hidden size H
    router_hidden: int = 0  # 0: linear head; >0: one SiLU hidden layer of this width

    def __post_init__(self) -> None:
        if self.num_experts < 1 or self.hidden_size < 1 or self.router_hidden < 0:
            raise ValueError(f"invalid router form {self}")

    def to_dict(self) -> dict:
        return asdict(self)


class HiddenStateRouter(nn.Module):
    """``(N, K*H)`` concatenated expert hidden states -> ``(N, K)`` normalized log weights."""

    def __init__(self, form: RouterForm) -> None:
        super().__init__()
        self.form = form
        in_features = form.num_experts * form.hidden_size
        if form.router_hidden:
            self.proj_in = nn.Linear(in_features, form.router_hidden)
            self.proj_out = nn.Linear(form.router_hidden, form.num_experts)
        else:
            self.proj_in = None
            self.proj_out = nn.Linear(in_features, form.num_experts)

    def forward(self, expert_hidden: torch.Tensor) -> torch.Tensor:
        hidden = expert_hidden
        if self.proj_in is not None:
            hidden = nn.functional.silu(self.proj_in(hidden))
        return torch.log_softmax(self.proj_out(hidden).float(), dim=-1)  # (N, K)

    @torch.no_grad()
    def set_constant(self, weights: torch.Tensor) -> HiddenStateRouter:
        """Make the router ignore its input and return ``weights`` (K,) everywhere."""
        if weights.shape != (self.form.num_experts,):
            raise ValueError(f"expected {self.form.num_experts} weights, got {tuple(weights.shape)}")
        if (weights < 0).any() or weights.sum() <= 0:
            raise ValueError("constant gate weights must be non-negative with a positive sum")
        for param in self.parameters():
            param.zero_()
        # A finite floor stands in for log 0 so the bias stays a finite parameter;
        # exp(-1e4) is exactly 0 in float32.
        probs = weights.double() / weights.double().sum()
        self.proj_out.bias.copy_(torch.log(probs).clamp_min(-1e4).to(self.proj_out.bias.dtype))
        return self


def constant_router(weights: list[float] | torch.Tensor, hidden_size: int) -> HiddenStateRouter:
    """A router that always returns the given weights (uniform, skewed or one-hot)."""
    weights = torch.as_tensor(weights, dtype=torch.float64)
    router = HiddenStateRouter(RouterForm(num_experts=len(weights), hidden_size=hidden_size))
    return router.set_constant(weights)


def uniform_log_weights(num_experts: int) -> torch.Tensor:
    return torch.full((num_experts,), -math.log(num_experts))
