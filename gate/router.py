"""The causal router gamma_phi(x_<t) that the engine runs at every token.

Its form is a head on the K experts' final hidden states at position t. Those
states are causal (they see x_<=t), are already computed by the engine for the
experts' own logits, and are cached through the experts' KV caches, so the
head costs one small matmul per token and no attention of its own.

The experts' states are trained to predict the next token, not to say which
domain the context is in, and can hide it (the synthetic x+1 / x-1 task: the
last token alone does not tell the direction). So the router may also carry a
small causal Llama of its own over the token ids (``context``: the experts'
attention shape, fewer layers), whose final state joins the head's input. In
the engine its layers are vLLM attention layers like the experts', with their
own paged KV cache.

A fixed weight vector is the same module with a zero weight and ``bias = log w``,
so the engine has one gate code path for "fixed", "uniform" and "learned".
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from gatemix.gate.mixing import LOG_WEIGHT_FLOOR
from gatemix.gate.posterior import prefix_state


@dataclass(frozen=True)
class RouterForm:
    """Architecture of the router; stored in the artifact so the engine can rebuild it."""

    num_experts: int
    hidden_size: int  # the experts' final hidden size H, when they all share one
    router_hidden: int = 0  # 0: linear head; >0: one SiLU hidden layer of this width
    # The router's own causal Llama (a Hugging Face LlamaConfig dict), or None.
    context_config: dict | None = None
    # Each expert's final hidden size, when they differ (experts of different sizes); None: all H.
    hidden_sizes: tuple[int, ...] | None = None
    # The posterior state (gate/posterior.py): a learned prior and forgetting factor whose
    # posterior log-weights are added to the head's logits (the head at zero: the posterior alone).
    posterior: bool = False
    # The head also reads the posterior's log-weights (K features after the hidden states).
    posterior_features: bool = False

    def __post_init__(self) -> None:
        if self.hidden_sizes is not None:
            object.__setattr__(self, "hidden_sizes", tuple(int(h) for h in self.hidden_sizes))
            if len(self.hidden_sizes) != self.num_experts or min(self.hidden_sizes) < 1:
                raise ValueError(f"invalid router form {self}: one positive hidden size per expert")
        if self.num_experts < 1 or self.hidden_size < 1 or self.router_hidden < 0:
            raise ValueError(f"invalid router form {self}")
        if self.posterior_features and not self.posterior:
            raise ValueError("posterior_features needs posterior")
        if self.context_config is not None:
            for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
                if not isinstance(self.context_config.get(key), int) or self.context_config[key] < 1:
                    raise ValueError(f"router context_config needs a positive {key}")

    @classmethod
    def for_experts(cls, hidden_sizes: list[int], **kwargs) -> RouterForm:
        """The form for experts of these final hidden sizes (in expert order)."""
        shared = len(set(hidden_sizes)) == 1
        return cls(
            num_experts=len(hidden_sizes),
            hidden_size=int(hidden_sizes[0]),
            hidden_sizes=None if shared else tuple(hidden_sizes),
            **kwargs,
        )

    @property
    def expert_widths(self) -> tuple[int, ...]:
        """``(H_1, ..., H_K)``: the widths of the concatenated expert states the head reads."""
        return self.hidden_sizes or (self.hidden_size,) * self.num_experts

    @property
    def context_size(self) -> int:
        return 0 if self.context_config is None else self.context_config["hidden_size"]

    @property
    def head_inputs(self) -> int:
        """Features the head reads: the experts' states, the context model's, the posterior's."""
        return sum(self.expert_widths) + self.context_size + (self.num_experts if self.posterior_features else 0)

    def to_dict(self) -> dict:
        form = asdict(self)
        # Fields at their old defaults are left out: an artifact written before them keeps its version.
        for name in ("hidden_sizes", "posterior", "posterior_features"):
            if not form[name]:
                del form[name]
        if "hidden_sizes" in form:
            form["hidden_sizes"] = list(form["hidden_sizes"])
        return form


def attention_shape(config: dict) -> tuple[int, int]:
    """``(KV heads, head size)`` of a Llama config dict: what one KV-cache layout needs to share."""
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    return (config.get("num_key_value_heads") or heads, head_dim)


def check_context_fits(context_config: dict | None, expert_config: dict) -> None:
    """Refuse a router context model the engine could not run beside these experts."""
    if context_config is None:
        return
    if context_config["vocab_size"] != expert_config["vocab_size"]:
        raise ValueError(
            f"the router's context model reads a vocabulary of {context_config['vocab_size']}, "
            f"the experts have {expert_config['vocab_size']}"
        )
    if attention_shape(context_config) != attention_shape(expert_config):
        raise ValueError(
            f"the router's context model has (KV heads, head size) {attention_shape(context_config)}, "
            f"the experts {attention_shape(expert_config)}: they must match"
        )


def context_config_like(expert_config: dict, num_layers: int = 1, intermediate_size: int = 0) -> dict:
    """The router's own Llama: the experts' vocabulary, width and attention shape, fewer layers.

    Sharing the attention shape (heads, KV heads, head size) keeps one KV-cache
    layout for every attention layer in the engine.
    """
    keep = (
        "vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
        "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_parameters",
        "rope_scaling", "bos_token_id", "eos_token_id", "pad_token_id", "hidden_act",
        "attention_bias", "mlp_bias",
    )
    config = {key: expert_config[key] for key in keep if expert_config.get(key) is not None}
    config.update(
        model_type="llama",
        num_hidden_layers=num_layers,
        intermediate_size=intermediate_size or expert_config["intermediate_size"],
        tie_word_embeddings=False,
    )
    return config


class HiddenStateRouter(nn.Module):
    """Concatenated expert hidden states (and token ids) -> ``(..., K)`` normalized log weights."""

    def __init__(self, form: RouterForm, build_context: bool = True) -> None:
        """``build_context=False`` builds the head alone (the engine runs the context model)."""
        super().__init__()
        self.form = form
        in_features = form.head_inputs
        if form.posterior:
            self.prior_logits = nn.Parameter(torch.zeros(form.num_experts))  # uniform prior
            # lambda = exp(-softplus(raw)) in (0, 1); -7 starts at 1 - 9e-4 (nearly Bayes).
            self.forgetting_raw = nn.Parameter(torch.tensor(-7.0))
        if form.router_hidden:
            self.proj_in = nn.Linear(in_features, form.router_hidden)
            self.proj_out = nn.Linear(form.router_hidden, form.num_experts)
        else:
            self.proj_in = None
            self.proj_out = nn.Linear(in_features, form.num_experts)
        self.context = None
        if form.context_config is not None and build_context:
            # transformers is deferred: most routers have no context model, and the
            # engine's workers import this module before they need one.
            from transformers import LlamaConfig, LlamaModel

            self.context = LlamaModel(LlamaConfig(**form.context_config))

    def forward(
        self,
        expert_hidden: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        next_logprobs: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``(N, T, sum_k H_k)`` states of tokens ``input_ids`` ``(N, T)`` -> ``(N, T, K)``.

        The token ids are needed only with a context model; position t of both
        is token t, so the weights at t decide token t + 1. A posterior router
        also needs ``next_logprobs`` ``(N, T, K)``: ``log pi_k(x_{t+1} | x_<=t)``
        at position t (zero where masked), whose exclusive scan is its state.
        """
        if self.context is not None:
            if input_ids is None:
                raise ValueError("this router reads the token ids: pass input_ids")
            context = self.context(input_ids=input_ids, attention_mask=attention_mask)
            expert_hidden = torch.cat(
                [expert_hidden, context.last_hidden_state.to(expert_hidden.dtype)], dim=-1
            )
        state = None
        if self.form.posterior:
            if next_logprobs is None:
                raise ValueError("this router reads the experts' log-probs of the prefix: pass next_logprobs")
            state = prefix_state(next_logprobs.float(), self.forgetting)
        return self.gate(expert_hidden, state)

    @property
    def forgetting(self) -> torch.Tensor:
        """The posterior's forgetting factor lambda in (0, 1) (1: the exact Bayes posterior)."""
        return torch.exp(-nn.functional.softplus(self.forgetting_raw))

    def gate(self, features: torch.Tensor, state: torch.Tensor | None = None) -> torch.Tensor:
        """``(..., sum_k H_k [+ C])`` features and the posterior state ``(..., K)`` -> ``(..., K)``.

        What the engine runs per token (it computes the context model and the
        state itself). Without a posterior the state is ignored.
        """
        hidden = features
        prior_and_state = None
        if self.form.posterior:
            if state is None:
                raise ValueError("this router needs the posterior state")
            prior_and_state = self.prior_logits.float() + state.float()  # (..., K)
            if self.form.posterior_features:
                posterior = torch.log_softmax(prior_and_state, dim=-1)
                hidden = torch.cat([hidden, posterior.to(hidden.dtype)], dim=-1)
        if self.proj_in is not None:
            hidden = nn.functional.silu(self.proj_in(hidden))
        logits = self.proj_out(hidden).float()
        if prior_and_state is not None:
            logits = logits + prior_and_state
        return torch.log_softmax(logits, dim=-1)  # (..., K)

    def head(self, features: torch.Tensor) -> torch.Tensor:
        """The gate of a router without a posterior: ``(..., sum_k H_k [+ C])`` -> ``(..., K)``."""
        return self.gate(features)

    def context_weights(self) -> dict[str, torch.Tensor]:
        """The context model's weights under Hugging Face Llama names (``model.`` dropped)."""
        if self.context is None:
            return {}
        return dict(self.context.state_dict())

    @torch.no_grad()
    def set_constant(self, weights: torch.Tensor) -> HiddenStateRouter:
        """Make the router ignore its input and return ``weights`` (K,) everywhere.

        Only the output layer changes (zero weight, ``bias = log w``): the
        hidden layer and the context model keep their values, so training can
        start from this point and move away from it.
        """
        if weights.shape != (self.form.num_experts,):
            raise ValueError(f"expected {self.form.num_experts} weights, got {tuple(weights.shape)}")
        if (weights < 0).any() or weights.sum() <= 0:
            raise ValueError("constant gate weights must be non-negative with a positive sum")
        self.proj_out.weight.zero_()
        # A finite floor stands in for log 0 so the bias stays a finite parameter.
        probs = weights.double() / weights.double().sum()
        self.proj_out.bias.copy_(torch.log(probs).clamp_min(LOG_WEIGHT_FLOOR).to(self.proj_out.bias.dtype))
        return self


def constant_router(
    weights: list[float] | torch.Tensor, hidden_size: int | list[int]
) -> HiddenStateRouter:
    """A router that always returns the given weights (uniform, skewed or one-hot).

    ``hidden_size``: the experts' shared final hidden size, or one per expert.
    """
    weights = torch.as_tensor(weights, dtype=torch.float64)
    sizes = hidden_size if isinstance(hidden_size, list) else [hidden_size] * len(weights)
    router = HiddenStateRouter(RouterForm.for_experts(sizes))
    return router.set_constant(weights)


def uniform_log_weights(num_experts: int) -> torch.Tensor:
    return torch.full((num_experts,), -math.log(num_experts))


def router_log_weights(
    router: HiddenStateRouter,
    hidden: torch.Tensor,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    next_logprobs: torch.Tensor | None = None,
) -> torch.Tensor:
    """The router's weights for predicting token t+1, for every scored position t.

    ``hidden`` ``(N, T-1, K*H)`` is aligned on the predicting position, and
    ``input_ids`` ``(N, T)`` are the whole sequences, whose first T-1 tokens are
    what a context model reads; ``next_logprobs`` ``(N, T-1, K)``, aligned like
    ``hidden``, feed a posterior router's state. -> ``(N, T-1, K)``.
    """
    if input_ids is not None:
        width = hidden.shape[1]
        input_ids = input_ids[:, :width]
        attention_mask = None if attention_mask is None else attention_mask[:, :width]
    return router(hidden.float(), input_ids, attention_mask, next_logprobs)
