"""The gate family, as per-token log weights over the K experts.

Every gate maps a batch's ``TokenFeatures`` to ``(N, T-1, K)`` normalized log
weights for predicting token t+1; the mixture is then ``mix_logprobs``. The
registry holds the baselines next to the learned router, the trivial
``uniform`` first:

- ``uniform``: ``1/K`` at every token;
- ``posterior``: the BTM posterior, weights from the prefix likelihood
  ``w_t,k ∝ prior_k pi_k(x_<=t)`` (a sequence-level constant gate, served per token);
- ``robust_constant``: Theorem 3's witness ``sigma_k ∝ exp(eps_k)``;
- ``learned``: a ``HiddenStateRouter`` on the experts' hidden states (what the engine runs).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from gatemix.gate.distill_router import TokenFeatures, router_log_weights
from gatemix.gate.mixing import mix_logprobs, normalize_log_weights
from gatemix.gate.router import HiddenStateRouter

TokenGate = Callable[[TokenFeatures], torch.Tensor]


def _constant(log_weights: torch.Tensor) -> TokenGate:
    def gate(features: TokenFeatures) -> torch.Tensor:
        return log_weights.expand(*features.next_logprobs.shape)

    return gate


def uniform_gate(num_experts: int) -> TokenGate:
    return _constant(torch.full((num_experts,), -torch.log(torch.tensor(float(num_experts)))))


def robust_constant_gate(epsilons: list[float] | torch.Tensor) -> TokenGate:
    """``sigma_k ∝ exp(eps_k)``: experts with a larger in-domain gap get more weight.

    Only differences of ``eps`` matter, so an estimate up to a shared constant
    (the in-domain cross-entropy, whose unknown entropy part is common when the
    domains' entropies are close) gives the same weights.
    """
    return _constant(normalize_log_weights(torch.as_tensor(epsilons, dtype=torch.float32)))


def posterior_gate(log_prior: torch.Tensor | None = None) -> TokenGate:
    def gate(features: TokenFeatures) -> torch.Tensor:
        scored = features.next_logprobs * features.token_mask.unsqueeze(-1)  # (N, T-1, K)
        prefix = scored.cumsum(1) - scored  # log pi_k(x_2..x_t), before predicting x_{t+1}
        prior = 0.0 if log_prior is None else log_prior
        return normalize_log_weights(prefix + prior)

    return gate


def learned_gate(router: HiddenStateRouter) -> TokenGate:
    @torch.no_grad()
    def gate(features: TokenFeatures) -> torch.Tensor:
        if features.hidden is None:
            raise ValueError("the learned router needs the experts' hidden states")
        return router_log_weights(
            router, features.hidden, features.input_ids, features.attention_mask,
            features.next_logprobs,
        )

    return gate


GATES: dict[str, Callable[..., TokenGate]] = {
    "uniform": uniform_gate,
    "posterior": posterior_gate,
    "robust_constant": robust_constant_gate,
    "learned": learned_gate,
}


def gated_token_logprobs(gate: TokenGate, features: TokenFeatures) -> torch.Tensor:
    """``log sum_k w_t,k pi_k(x_{t+1}|x_<=t)``. -> ``(N, T-1)``, zero where masked."""
    mixed = mix_logprobs(features.next_logprobs.unsqueeze(-1), gate(features)).squeeze(-1)
    return mixed * features.token_mask
