"""The paper's synthetic experiment, small enough to run as a test on a laptop CPU.

Vocabulary 100; domain A follows ``x_{t+1} = x_t + 1 mod 100`` and domain B
``x_{t+1} = x_t - 1 mod 100`` from a uniform start token. The two rules
conflict directly, so one small model trained on both must spend capacity to
tell them apart, while a gate only has to pick the right expert.

The start token is uniform under every model, so it is left out of every
log-prob: sequence log-probs are conditional on ``x_1``. Then ``P_lambda(x) =
lambda`` on A's sequences and ``1 - lambda`` on B's (the supports are
disjoint), and ``KL(P_lambda || m)`` is exact by enumerating the 200 sequences.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from gatemix.gate.fit.config import PrimalDualConfig, RouterFitConfig
from gatemix.gate.fit.game_data import GateFitData
from gatemix.gate.fit.primal_dual import PrimalDualResult, run_primal_dual
from gatemix.gate.fit.router_fit import fit_router, routed_token_logprobs
from gatemix.gate.fit.sequence_gate import SequenceGate, SequenceGateForm
from gatemix.gate.mixing import mix_sequence_logprobs
from gatemix.gate.router import HiddenStateRouter
from gatemix.gate.token_features import TokenFeatures

VOCAB = 100
DIRECTIONS = (1, -1)  # domain A, domain B


class TinyCausalLM(nn.Module):
    """A 1-layer pre-norm causal transformer; returns logits and its final (normed) hidden states."""

    def __init__(self, width: int, layers: int = 1, heads: int = 2, max_length: int = 16) -> None:
        super().__init__()
        self.width = width
        self.token_embedding = nn.Embedding(VOCAB, width)
        self.position_embedding = nn.Embedding(max_length, width)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True
            )
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(width)
        self.unembed = nn.Linear(width, VOCAB)

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        length = input_ids.shape[1]
        causal = nn.Transformer.generate_square_subsequent_mask(length)
        hidden = self.token_embedding(input_ids) + self.position_embedding.weight[:length]
        for block in self.blocks:
            hidden = block(hidden, src_mask=causal, is_causal=True)
        hidden = self.norm(hidden)  # (B, T, W): what the router reads
        return self.unembed(hidden), hidden


def rule_sequences(direction: int, starts: torch.Tensor, length: int) -> torch.Tensor:
    """``(N,)`` start tokens -> ``(N, length)`` sequences of one domain."""
    return (starts.unsqueeze(1) + direction * torch.arange(length)) % VOCAB


def mixed_batch(
    weights: tuple[float, float], size: int, length: int, generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch from ``P_lambda``: ids (size, length) and domain ids (size,)."""
    domain = torch.multinomial(torch.tensor(weights), size, replacement=True, generator=generator)
    starts = torch.randint(VOCAB, (size,), generator=generator)
    direction = torch.tensor(DIRECTIONS)[domain]
    return (starts.unsqueeze(1) + direction.unsqueeze(1) * torch.arange(length)) % VOCAB, domain


def train_lm(
    model: TinyCausalLM,
    weights: tuple[float, float],
    *,
    steps: int,
    length: int,
    batch_size: int = 64,
    learning_rate: float = 1e-2,
    seed: int = 0,
) -> float:
    """Next-token training on ``P_weights``; returns the last loss (nats/token)."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for _ in range(steps):
        input_ids, _ = mixed_batch(weights, batch_size, length, generator)
        logits, _ = model(input_ids[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), input_ids[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    return loss.item()


@torch.no_grad()
def lm_sequence_logprobs(model: TinyCausalLM, input_ids: torch.Tensor) -> torch.Tensor:
    """``log m(x_2..x_T | x_1)``. ``(N, T) -> (N,)``."""
    logits, _ = model(input_ids[:, :-1])
    return torch.log_softmax(logits, -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1).sum(1)


class SyntheticExpertBank:
    """The two tiny experts behind the ``ExpertBank`` protocol of the router fit."""

    def __init__(self, experts: list[TinyCausalLM]) -> None:
        self.experts = experts
        self.num_experts = len(experts)
        self.hidden_sizes = [expert.width for expert in experts]

    @torch.no_grad()
    def score(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, with_hidden: bool = True
    ) -> TokenFeatures:
        logprobs, hidden = [], []
        for expert in self.experts:
            logits, states = expert(input_ids[:, :-1])
            logprobs.append(torch.log_softmax(logits, -1).gather(-1, input_ids[:, 1:, None]))
            hidden.append(states)
        return TokenFeatures(
            input_ids,
            attention_mask,
            torch.cat(logprobs, -1),
            torch.cat(hidden, -1) if with_hidden else None,
            attention_mask[:, 1:].float(),
        )

    @torch.no_grad()
    def sample(
        self, expert: int, num: int, length: int, generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        input_ids = torch.randint(VOCAB, (num, 1), generator=generator)
        for _ in range(length - 1):
            logits, _ = self.experts[expert](input_ids)
            probs = torch.softmax(logits[:, -1].double(), -1)
            input_ids = torch.cat([input_ids, torch.multinomial(probs, 1, generator=generator)], 1)
        return input_ids, torch.ones_like(input_ids)


def kl_curve(
    domain_logprobs: tuple[torch.Tensor, torch.Tensor], lambdas: list[float]
) -> list[float]:
    """Exact ``KL(P_lambda || m)`` in nats per sequence from ``log m`` on all A and all B sequences."""
    mean_a, mean_b = (float(lp.double().mean()) for lp in domain_logprobs)
    curve = []
    for lam in lambdas:
        value = 0.0
        if lam > 0:
            value += lam * (math.log(lam) - mean_a)
        if lam < 1:
            value += (1 - lam) * (math.log(1 - lam) - mean_b)
        curve.append(value)
    return curve


@dataclass
class SyntheticConfig:
    length: int = 8
    expert_width: int = 16  # width 8 learns the rule, but its hidden states hide the direction
    gate_width: int = 6
    monolithic_width: int = 28  # about the parameters of two experts, the gate and the router
    lm_steps: int = 500  # per expert; the monolithic model gets twice as many (same compute)
    lm_learning_rate: float = 3e-2
    gate_sequences: int = 200  # per domain, in the gate split
    router_hidden: int = 64
    router_context: bool = True  # the router's own 1-layer causal Llama over the tokens
    router_samples: int = (
        2000  # enough to visit every (start, direction): the router must see them
    )
    router_steps: int = 3000
    router_learning_rate: float = 1e-2
    seed: int = 0
    primal_dual: PrimalDualConfig = field(
        default_factory=lambda: PrimalDualConfig(
            steps=300,
            batch_per_domain=16,
            learning_rate=3e-3,
            lambda_step=0.3,
            mu_step=0.5,
            z_ema_decay=0.8,
            checkpoint_every=0,
            torch_threads=1,
        )
    )


@dataclass
class SyntheticResult:
    lambdas: list[float]
    kl: dict[str, list[float]]  # method -> KL(P_lambda || model) per lambda, nats/sequence
    lambda_avg: list[float]
    z_avg: float
    mu_avg: float
    parameters: dict[str, int]
    router_fit: dict  # the router stage's statistics (its sampling's acceptance)
    history: dict
    gap: dict  # the game's final duality-gap check (convergence.DualityGap.to_dict())


def _fit_features(
    bank: SyntheticExpertBank, per_domain: int, length: int, generator
) -> GateFitData:
    parts = [
        bank.score(ids, torch.ones_like(ids))
        for ids in (
            rule_sequences(d, torch.randint(VOCAB, (per_domain,), generator=generator), length)
            for d in DIRECTIONS
        )
    ]
    features = TokenFeatures.concat(parts)
    domain = torch.arange(2).repeat_interleave(per_domain)
    # No q pool: these experts learn their rules exactly, so a balanced data batch
    # is itself a draw from q and estimates Z without bias, on the same sequences
    # as the loss (a separate pool of q samples converged slower in 300 steps).
    return GateFitData(
        {
            "domain": domain,
            "num_tokens": features.num_tokens(),
            "expert_sequence_logprobs": features.sequence_logprobs(),
            "input_ids": features.input_ids,
            "attention_mask": features.attention_mask,
        },
        num_domains=2,
    )


def _synthetic_context_config(config: SyntheticConfig) -> dict:
    return {
        "model_type": "llama",
        "vocab_size": VOCAB,
        "hidden_size": config.expert_width,
        "intermediate_size": 2 * config.expert_width,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "max_position_embeddings": config.length,
        "tie_word_embeddings": False,
    }


def train_models(config: SyntheticConfig) -> tuple[list[TinyCausalLM], TinyCausalLM]:
    """The two experts, each on its own rule, and the monolithic model on both (twice the steps)."""
    experts = [TinyCausalLM(config.expert_width) for _ in DIRECTIONS]
    for index, expert in enumerate(experts):
        weights = (1.0, 0.0) if index == 0 else (0.0, 1.0)
        train_lm(
            expert,
            weights,
            steps=config.lm_steps,
            length=config.length,
            learning_rate=config.lm_learning_rate,
            seed=config.seed + index,
        )
    monolithic = TinyCausalLM(config.monolithic_width)
    train_lm(
        monolithic,
        (0.5, 0.5),
        steps=2 * config.lm_steps,
        length=config.length,
        learning_rate=config.lm_learning_rate,
        seed=config.seed + 2,
    )
    return experts, monolithic


def fit_robust_gate(
    bank: SyntheticExpertBank, config: SyntheticConfig
) -> tuple[SequenceGate, PrimalDualResult]:
    """The sequence gate fitted by the primal-dual game on the gate split of both rules."""
    generator = torch.Generator().manual_seed(config.seed + 3)
    data = _fit_features(bank, config.gate_sequences, config.length, generator)
    gate = SequenceGate(
        SequenceGateForm(
            VOCAB, 2, width=config.gate_width, num_layers=1, num_heads=2, max_length=config.length
        )
    )
    return gate, run_primal_dual(gate, data, config.primal_dual)


def router_fit_config(config: SyntheticConfig) -> RouterFitConfig:
    """The router stage on exact (rejection) samples of the gate, with its own context model."""
    return RouterFitConfig(
        router_hidden=config.router_hidden,
        context_config=_synthetic_context_config(config) if config.router_context else None,
        num_samples=config.router_samples,
        length=config.length,
        sampler="rejection",
        steps=config.router_steps,
        batch_size=256,
        learning_rate=config.router_learning_rate,
        seed=config.seed,
    )


@torch.no_grad()
def method_logprobs(
    bank: SyntheticExpertBank,
    gate: SequenceGate,
    router: HiddenStateRouter,
    monolithic: TinyCausalLM,
    length: int,
) -> dict[str, list[torch.Tensor]]:
    """Method -> its ``log m(x_2..x_T | x_1)`` on every A sequence and every B sequence."""
    everything = torch.arange(VOCAB)
    test = [
        bank.score(ids, torch.ones_like(ids))
        for ids in (rule_sequences(d, everything, length) for d in DIRECTIONS)
    ]
    return {
        "expert_a": [f.sequence_logprobs()[:, 0] for f in test],
        "expert_b": [f.sequence_logprobs()[:, 1] for f in test],
        "uniform_constant": [
            mix_sequence_logprobs(f.sequence_logprobs(), torch.full((2,), -math.log(2)))
            for f in test
        ],
        "gate": [
            mix_sequence_logprobs(f.sequence_logprobs(), gate(f.input_ids, f.attention_mask))
            for f in test
        ],
        "uniform_per_token": [
            torch.logsumexp(f.next_logprobs - math.log(2), -1).sum(1) for f in test
        ],
        "router": [
            routed_token_logprobs(router, f.hidden, f.next_logprobs, f.input_ids).sum(1)
            for f in test
        ],
        "monolithic": [lm_sequence_logprobs(monolithic, f.input_ids) for f in test],
    }


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def run_synthetic_experiment(config: SyntheticConfig | None = None) -> SyntheticResult:
    """Train experts, a monolithic model, the robust gate and its router; return KL curves."""
    config = config or SyntheticConfig()
    torch.set_num_threads(config.primal_dual.torch_threads)
    torch.manual_seed(config.seed)
    experts, monolithic = train_models(config)
    bank = SyntheticExpertBank(experts)
    gate, fit = fit_robust_gate(bank, config)
    router, router_stats = fit_router(bank, gate, router_fit_config(config))
    per_method = method_logprobs(bank, gate, router, monolithic, config.length)
    lambdas = [round(0.1 * i, 1) for i in range(11)]
    return SyntheticResult(
        lambdas=lambdas,
        kl={name: kl_curve(tuple(lps), lambdas) for name, lps in per_method.items()},
        lambda_avg=fit.lambda_avg,
        z_avg=fit.z_avg,
        mu_avg=fit.mu_avg,
        parameters={
            "expert": parameter_count(experts[0]),
            "gate": parameter_count(gate),
            "router": parameter_count(router),
            "monolithic": parameter_count(monolithic),
        },
        router_fit=router_stats,
        history=fit.history,
        gap=fit.gap.to_dict(),
    )
