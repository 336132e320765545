"""The gate family and its baselines, as per-token log weights over the K experts.

Every gate maps a batch's ``TokenFeatures`` to ``(N, T-1, K)`` normalized log
weights for predicting token t+1; the mixture is then ``mix_logprobs``. The
registry holds the baselines next to the learned routers, the trivial
``uniform`` first:

- ``uniform``: ``1/K`` at every token;
- ``posterior``: the BTM posterior, weights from the prefix likelihood
  ``w_t,k ∝ prior_k pi_k(x_<=t)``. For a constant sequence-level gate sigma this
  is exactly the paper's ``pi_sigma(x) = sum_k sigma_k pi_k(x)``, served per token;
- ``robust_constant``: Theorem 3's witness ``sigma_k ∝ exp(eps_k)`` as that
  sequence-level gate (the posterior with prior sigma);
- ``robust_constant_per_token``: the same sigma mixed per token with fixed weights,
  a different and much weaker model (kept under its own name);
- ``learned``: any fitted ``HiddenStateRouter`` (what the engine runs).

``GATE_FAMILY`` names the learned members the fit chooses among; each is a
``HiddenStateRouter`` form the engine serves as it is, and each is also a
``GATES`` entry (its fitted router -> its gate).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from gatemix.gate.mixing import mix_logprobs, normalize_log_weights
from gatemix.gate.router import HiddenStateRouter, RouterForm, router_log_weights
from gatemix.gate.token_features import TokenFeatures

TokenGate = Callable[[TokenFeatures], torch.Tensor]


def _constant(log_weights: torch.Tensor) -> TokenGate:
    def gate(features: TokenFeatures) -> torch.Tensor:
        return log_weights.expand(*features.next_logprobs.shape)

    return gate


def uniform_gate(num_experts: int) -> TokenGate:
    return _constant(torch.full((num_experts,), -torch.log(torch.tensor(float(num_experts)))))


def robust_sigma(epsilons: list[float] | torch.Tensor) -> torch.Tensor:
    """``log sigma_k`` with ``sigma_k ∝ exp(eps_k)``: experts with a larger in-domain gap get more.

    Only differences of ``eps`` matter, so an estimate up to a shared constant
    (the in-domain cross-entropy, whose unknown entropy part is common when the
    domains' entropies are close) gives the same weights. ``(K,) -> (K,)``.
    """
    return normalize_log_weights(torch.as_tensor(epsilons, dtype=torch.float32))


def robust_constant_gate(epsilons: list[float] | torch.Tensor) -> TokenGate:
    """The paper's robust constant gate ``pi_sigma``, sigma ∝ exp(eps): the posterior with prior sigma."""
    return posterior_gate(robust_sigma(epsilons))


def robust_constant_per_token_gate(epsilons: list[float] | torch.Tensor) -> TokenGate:
    """sigma ∝ exp(eps) as fixed weights at every token: not the paper's constant gate."""
    return _constant(robust_sigma(epsilons))


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


@dataclass(frozen=True)
class FamilyMember:
    """One learned member of the gate family: its router form and what of it is trained."""

    name: str
    posterior: bool  # a learned prior and forgetting factor whose state joins the logits
    posterior_features: bool  # the head also reads the posterior's log-weights
    train_head: bool  # False: the head stays at zero, the member is the posterior alone
    about: str
    train_forgetting: bool = True  # False: forgetting 1, the exact sequence-level constant gate

    def form(self, hidden_sizes: list[int], router_hidden: int = 0,
             context_config: dict | None = None) -> RouterForm:
        if not self.train_head:  # a frozen head reads nothing: no hidden layer, no context model
            router_hidden, context_config = 0, None
        return RouterForm.for_experts(
            hidden_sizes, router_hidden=router_hidden, context_config=context_config,
            posterior=self.posterior, posterior_features=self.posterior_features,
        )

    def new_router(self, hidden_sizes: list[int], router_hidden: int = 0,
                   context_config: dict | None = None) -> HiddenStateRouter:
        """The member at its starting point: the uniform gate, or the Bayes posterior with a uniform prior."""
        router = HiddenStateRouter(self.form(hidden_sizes, router_hidden, context_config))
        router.set_constant(torch.ones(router.form.num_experts))
        if not self.train_head:
            for name, parameter in router.named_parameters():
                if name not in POSTERIOR_PARAMETERS:
                    parameter.requires_grad_(False)
        if self.posterior and not self.train_forgetting:
            with torch.no_grad():
                router.forgetting_raw.fill_(EXACT_BAYES_RAW)
            router.forgetting_raw.requires_grad_(False)
        return router


# exp(-softplus(-30)) = 1 - 1e-13: the posterior of the whole prefix, the exact pi_sigma.
EXACT_BAYES_RAW = -30.0


POSTERIOR_PARAMETERS = ("prior_logits", "forgetting_raw")

GATE_FAMILY: dict[str, FamilyMember] = {
    "minimax_constant": FamilyMember(
        "minimax_constant", posterior=True, posterior_features=False, train_head=False,
        train_forgetting=False,
        about="the constant sequence-level gate sigma the minimax game picks (the posterior with "
              "prior sigma and no forgetting: the paper's pi_sigma, served exactly)",
    ),
    "learned_posterior": FamilyMember(
        "learned_posterior", posterior=True, posterior_features=False, train_head=False,
        about="the posterior with a learned prior and forgetting factor (head frozen at zero)",
    ),
    "hidden_state_router": FamilyMember(
        "hidden_state_router", posterior=False, posterior_features=False, train_head=True,
        about="a head on the experts' final hidden states",
    ),
    "posterior_router": FamilyMember(
        "posterior_router", posterior=True, posterior_features=True, train_head=True,
        about="the learned posterior plus a head on the hidden states and the posterior's log-weights",
    ),
}

GATES: dict[str, Callable[..., TokenGate]] = {
    "uniform": uniform_gate,
    "posterior": posterior_gate,
    "robust_constant": robust_constant_gate,
    "robust_constant_per_token": robust_constant_per_token_gate,
    "learned": learned_gate,
    **{name: learned_gate for name in GATE_FAMILY},
}


def gated_token_logprobs(gate: TokenGate, features: TokenFeatures) -> torch.Tensor:
    """``log sum_k w_t,k pi_k(x_{t+1}|x_<=t)``. -> ``(N, T-1)``, zero where masked."""
    mixed = mix_logprobs(features.next_logprobs.unsqueeze(-1), gate(features)).squeeze(-1)
    return mixed * features.token_mask
