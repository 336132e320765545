"""The one config of ``gatemix fit-gate``: a dataclass with help on every field.

``PrimalDualConfig`` holds the loop's hyperparameters and is all that the loop
itself reads (the synthetic experiment uses it alone); ``FitGateConfig`` adds
the paths, the features and the router stage for the real-text job. The router
stage reads one ``RouterFitConfig``, which ``FitGateConfig.router_fit`` builds
from its flat fields (one flag each) and the synthetic experiment builds itself.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field

from gatemix.config_cli import field_help

ROUTER_SOURCES = ("samples", "data", "both")
# What ``fit-gate --stage`` may name: every stage, or the router's stages over a saved stage 1.
FIT_STAGES = ("all", "router")
SAMPLERS = ("sir", "rejection")


@dataclass(frozen=True)
class RouterFitConfig:
    """What the router stage (``router_fit.fit_router``) reads, as one object."""

    router_hidden: int = field(default=0, **field_help("router hidden width (0: linear head)"))
    source: str = field(
        default="samples", **field_help("training data: 'samples' of pi_g, lambda-weighted 'data', 'both'")
    )
    num_samples: int = field(default=256, **field_help("sequences sampled from the robust model"))
    length: int = field(default=64, **field_help("tokens per sampled sequence"))
    sampler: str = field(default="sir", **field_help("'sir' or 'rejection'"))
    oversample: int = field(default=4, **field_help("SIR without proposals: draws per kept sample"))
    steps: int = field(default=400, **field_help("router training steps"))
    batch_size: int = field(default=16, **field_help("sequences per router training step"))
    learning_rate: float = field(default=3e-3, **field_help("router AdamW learning rate"))
    holdout_fraction: float = field(
        default=0.0, **field_help("share of the sequences held out to pick the best step")
    )
    seed: int = field(default=0, **field_help("seed of the sampling, the init and the batches"))
    context_config: dict | None = field(
        default=None, **field_help("the router's own causal Llama (a LlamaConfig dict), or None")
    )


@dataclass
class PrimalDualConfig:
    steps: int = field(default=600, **field_help("primal-dual iterations"))
    batch_per_domain: int = field(default=16, **field_help("sequences sampled per domain each step"))
    learning_rate: float = field(default=1e-3, **field_help("AdamW learning rate for the gate (theta)"))
    weight_decay: float = field(default=0.01, **field_help("AdamW weight decay for the gate"))
    lambda_step: float = field(
        default=0.2,
        **field_help(
            "exponentiated-gradient step size for lambda, per nat/token of loss (with batch losses "
            "this noisy, larger steps chase the noise: the bound's best step is sqrt(log D / T) / G)"
        ),
    )
    lambda_warmup: float = field(
        default=0.1,
        **field_help(
            "share of the first steps that hold lambda at its start while theta moves: an early "
            "transient loss would otherwise crush a domain that the exponentiated gradient, which "
            "never forgets, can only win back slowly"
        ),
    )
    lambda_smoothing: float = field(
        default=0.0,
        **field_help("mix lambda with uniform after each step (0: none, 1: lambda fixed uniform)"),
    )
    lambda_lower: tuple[float, ...] | None = field(
        default=None, **field_help("prior region: per-domain lower bounds on lambda (None: the simplex)")
    )
    lambda_upper: tuple[float, ...] | None = field(
        default=None, **field_help("prior region: per-domain upper bounds on lambda (None: 1)")
    )
    fixed_lambda: tuple[float, ...] | None = field(
        default=None, **field_help("freeze lambda at these weights (ERM with data proportions); no EG")
    )
    mu_step: float = field(
        default=0.2, **field_help("dual-ascent step size for mu on Z_g - 1 (the integral term)")
    )
    mu_proportional: float = field(
        default=2.0,
        **field_help(
            "proportional gain on Z_ema - 1 added to mu in the Lagrangian (a PI controller: mu is "
            "the integral term); damps the oscillation of mu and Z that dual ascent alone shows"
        ),
    )
    mu_nonnegative: bool = field(
        default=False, **field_help("treat the constraint as Z_g <= 1 (mu >= 0) instead of Z_g = 1")
    )
    z_ema_decay: float = field(
        default=0.9, **field_help("EMA decay of the Z_g estimate used by the mu step")
    )
    loss: str = field(
        default="excess",
        **field_help(
            "per-domain loss: 'excess' over the in-domain expert (KL proxy) or 'cross_entropy'"
        ),
    )
    average_from: float = field(
        default=0.5,
        **field_help("fraction of the steps after which lambda, mu, Z and the parameters are averaged"),
    )
    step_schedule: str = field(
        default="inverse_sqrt",
        **field_help(
            "step sizes of theta, lambda and mu over the steps: 'constant', or 'inverse_sqrt' "
            "(each times 1/sqrt(1 + t / (schedule_scale * steps)), the saddle-point rate)"
        ),
    )
    schedule_scale: float = field(
        default=0.05, **field_help("share of the steps after which the inverse-sqrt decay sets in")
    )
    average_parameters: bool = field(
        default=True,
        **field_help("return the average of theta's iterates after average_from (not the last one)"),
    )
    gap_every: int = field(
        default=100, **field_help("steps between duality-gap checks of the averaged iterates (0: end only)")
    )
    gap_batch_per_domain: int = field(
        default=512,
        **field_help(
            "sequences per domain (at most: a domain's all) the gap is measured on; the max over "
            "domains of a small sample's noisy means biases the gap up"
        ),
    )
    best_response_fraction: float = field(
        default=0.25,
        **field_help(
            "the final check's best response to the averaged lambda: this share of the steps "
            "of a fit with lambda and mu frozen (0: the lambda side of the gap only)"
        ),
    )
    checkpoint_every: int = field(default=100, **field_help("steps between checkpoints (0: never)"))
    seed: int = field(default=0, **field_help("seed for the gate's init and the minibatch sampling"))
    torch_threads: int = field(default=2, **field_help("CPU threads torch may use"))

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_per_domain < 1:
            raise ValueError("steps and batch_per_domain must be positive")
        if self.learning_rate <= 0 or self.weight_decay < 0:
            raise ValueError("learning_rate must be positive and weight_decay non-negative")
        if min(self.lambda_step, self.mu_step, self.mu_proportional) < 0:
            raise ValueError("lambda_step, mu_step and mu_proportional must be non-negative")
        if not 0 <= self.lambda_warmup < 1:
            raise ValueError(f"lambda_warmup must be in [0, 1), got {self.lambda_warmup}")
        if not 0 <= self.lambda_smoothing <= 1:
            raise ValueError(f"lambda_smoothing must be in [0, 1], got {self.lambda_smoothing}")
        if not 0 <= self.z_ema_decay < 1:
            raise ValueError(f"z_ema_decay must be in [0, 1), got {self.z_ema_decay}")
        if not 0 <= self.average_from < 1:
            raise ValueError(f"average_from must be in [0, 1), got {self.average_from}")
        if self.loss not in ("excess", "cross_entropy"):
            raise ValueError(f"loss must be 'excess' or 'cross_entropy', got {self.loss!r}")
        if self.step_schedule not in ("constant", "inverse_sqrt"):
            raise ValueError(
                f"step_schedule must be 'constant' or 'inverse_sqrt', got {self.step_schedule!r}"
            )
        if self.schedule_scale <= 0 or not 0 <= self.best_response_fraction <= 1:
            raise ValueError("schedule_scale must be positive and best_response_fraction in [0, 1]")
        if self.gap_every < 0 or self.gap_batch_per_domain < 1:
            raise ValueError("gap_every must be >= 0 and gap_batch_per_domain positive")
        if self.checkpoint_every < 0 or self.torch_threads < 1:
            raise ValueError("checkpoint_every must be >= 0 and torch_threads >= 1")
        if self.lambda_lower is not None and sum(self.lambda_lower) > 1:
            raise ValueError("lambda_lower sums above 1: the prior region is empty")
        if self.lambda_upper is not None and sum(self.lambda_upper) < 1:
            raise ValueError("lambda_upper sums below 1: the prior region is empty")
        if self.fixed_lambda is not None and (
            min(self.fixed_lambda) < 0 or abs(sum(self.fixed_lambda) - 1) > 1e-6
        ):
            raise ValueError("fixed_lambda must be non-negative and sum to 1")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class FitGateConfig(PrimalDualConfig):
    project: str = field(
        default="",
        **field_help("the project file (or a folder holding gatemix.toml): experts and each domain's data"),
    )
    out_dir: str = field(
        default="", **field_help("where the router artifact goes (default: <project work_dir>/gate)")
    )
    work_dir: str = field(
        default="", **field_help("checkpoints, plots and the report (default: <out_dir>/fit)")
    )
    cache_dir: str = field(
        default="", **field_help("disk cache of expert features (default: <project work_dir>/cache)")
    )
    device: str = field(
        default="auto", **field_help("where the experts score the text: auto (cuda if there is one), cpu, cuda, cuda:1")
    )
    dtype: str = field(
        default="auto", **field_help("the experts' dtype for scoring: auto (bf16 on GPU, fp32 on CPU), float32, bfloat16")
    )
    max_length: int = field(default=256, **field_help("tokens per sequence read from the gate split"))
    max_sequences: int = field(default=0, **field_help("cap on sequences per domain and split (0: all)"))
    feature_batch_size: int = field(default=8, **field_help("sequences per expert forward pass"))
    gate_width: int = field(default=48, **field_help("sequence gate width (about 0.3M params at 48)"))
    gate_layers: int = field(default=2, **field_help("sequence gate transformer layers"))
    gate_heads: int = field(default=4, **field_help("sequence gate attention heads"))
    gate_pooling: str = field(default="mean", **field_help("sequence gate pooling: 'mean' or 'last'"))
    router_hidden: int = field(default=0, **field_help("causal router hidden width (0: linear head)"))
    router_context_layers: int = field(
        default=0,
        **field_help(
            "layers of the router's own causal Llama over the tokens (0: a head on the experts' "
            "states only; on the small demo a context model overfits its few gate sequences)"
        ),
    )
    router_context_intermediate: int = field(
        default=0, **field_help("MLP width of the router's own Llama (0: the experts')")
    )
    sampler: str = field(
        default="sir", **field_help("sampling from the robust model: 'sir' or 'rejection'")
    )
    distill_samples: int = field(default=256, **field_help("sequences sampled from the robust model"))
    sample_length: int = field(default=64, **field_help("new tokens per sampled sequence"))
    sir_oversample: int = field(
        default=4, **field_help("SIR without a q pool: proposals drawn per kept sample")
    )
    q_samples: int = field(
        default=1024,
        **field_help("sequences drawn from q = mean of the experts: Z_g's estimate and SIR's proposals"),
    )
    distill_steps: int = field(default=400, **field_help("router training steps"))
    distill_batch_size: int = field(default=16, **field_help("sequences per router training step"))
    distill_learning_rate: float = field(default=3e-3, **field_help("router AdamW learning rate"))
    distill_source: str = field(
        default="both",
        **field_help(
            "router training data: 'samples' from the robust model (the paper's route), "
            "the gate split's real 'data' weighted by the game's lambda, or 'both'"
        ),
    )
    distill_holdout: float = field(
        default=0.1, **field_help("share of the router's sequences held out to pick its best step")
    )
    family: tuple[str, ...] = field(
        default=("minimax_constant", "learned_posterior", "hidden_state_router", "posterior_router"),
        **field_help(
            "members of the gate family (gate/registry.py GATE_FAMILY) fitted by the game "
            "directly on their per-token mixture loss; each is a candidate to serve"
        ),
    )
    router_learning_rate: float = field(
        default=3e-3,
        **field_help(
            "AdamW learning rate of the family members' heads (and the ERM router); "
            "learning_rate is the sequence gate's"
        ),
    )
    posterior_learning_rate: float = field(
        default=0.05, **field_help("AdamW learning rate of a posterior member's prior and forgetting factor")
    )
    two_stage: bool = field(
        default=True,
        **field_help(
            "also take the paper's two-stage route: the sequence gate by the game, then the head "
            "router fitted to it (a candidate too); off: no sequence gate, no q pool"
        ),
    )
    direct_router: bool = field(
        default=True,
        **field_help("fit the family by the game directly (off: the two-stage router is the only candidate)"),
    )
    served_router: str = field(
        default="best",
        **field_help(
            "the router the artifact serves: 'best' of the candidates by worst-domain excess on "
            "the held-out selection share, or one by name ('two_stage' or a family member)"
        ),
    )
    selection_fraction: float = field(
        default=0.2,
        **field_help("share of each domain's gate sequences held out of every fit, to pick the router"),
    )
    switching_sequences: int = field(
        default=64,
        **field_help("report: sequences built from eval-split chunks of 2-3 domains (0: none)"),
    )
    progress: bool = field(default=True, **field_help("show progress bars"))
    evaluate: bool = field(
        default=True, **field_help("evaluate against the baselines on the eval split")
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if not (self.device in ("auto", "cpu") or self.device.startswith("cuda")):
            raise ValueError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")
        if min(self.feature_batch_size, self.gate_width, self.gate_heads) < 1:
            raise ValueError("feature_batch_size, gate_width and gate_heads must be positive")
        if self.max_length < 2:
            raise ValueError("max_length must be at least 2 (one scored token)")
        if min(self.router_context_layers, self.router_context_intermediate) < 0:
            raise ValueError("router_context_layers and router_context_intermediate must be >= 0")
        if self.max_sequences < 0 or self.router_hidden < 0 or self.gate_layers < 0:
            raise ValueError("max_sequences, router_hidden and gate_layers must be non-negative")
        if self.gate_width % self.gate_heads:
            raise ValueError("gate_width must be a multiple of gate_heads")
        if self.gate_pooling not in ("mean", "last"):
            raise ValueError(f"gate_pooling must be 'mean' or 'last', got {self.gate_pooling!r}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be 'sir' or 'rejection', got {self.sampler!r}")
        if self.distill_source not in ROUTER_SOURCES:
            raise ValueError(
                f"distill_source must be 'samples', 'data' or 'both', got {self.distill_source!r}"
            )
        if not 0 <= self.selection_fraction < 1:
            raise ValueError(f"selection_fraction must be in [0, 1), got {self.selection_fraction}")
        if self.served_router == "best" and self.selection_fraction == 0:
            raise ValueError("served_router 'best' needs a selection_fraction above 0")
        if not (self.two_stage or (self.direct_router and self.family)):
            raise ValueError("nothing to fit: enable two_stage or the family (direct_router)")
        if min(self.posterior_learning_rate, self.router_learning_rate) <= 0:
            raise ValueError("posterior_learning_rate and router_learning_rate must be positive")
        if self.switching_sequences < 0:
            raise ValueError(f"switching_sequences must be >= 0, got {self.switching_sequences}")
        if not 0 <= self.distill_holdout < 1:
            raise ValueError(f"distill_holdout must be in [0, 1), got {self.distill_holdout}")
        if min(self.distill_samples, self.sample_length, self.sir_oversample, self.q_samples) < 1:
            raise ValueError("distill_samples, sample_length and sir_oversample must be positive")
        if self.distill_steps < 1 or self.distill_batch_size < 1 or self.distill_learning_rate <= 0:
            raise ValueError(
                "distill_steps, distill_batch_size, distill_learning_rate must be positive"
            )

    def primal_dual(self) -> PrimalDualConfig:
        """The loop's own settings (the sequence gate's game)."""
        names = {f.name for f in dataclasses.fields(PrimalDualConfig)}
        return PrimalDualConfig(**{k: v for k, v in self.to_dict().items() if k in names})

    def router_game(self) -> PrimalDualConfig:
        """The games of the routers: the loop's settings with the routers' own learning rate."""
        return dataclasses.replace(self.primal_dual(), learning_rate=self.router_learning_rate)

    def router_fit(self, context_config: dict | None = None) -> RouterFitConfig:
        """The router stage's settings (``distill_*`` flags: their names predate the stage's)."""
        return RouterFitConfig(
            router_hidden=self.router_hidden,
            source=self.distill_source,
            num_samples=self.distill_samples,
            length=self.sample_length,
            sampler=self.sampler,
            oversample=self.sir_oversample,
            steps=self.distill_steps,
            batch_size=self.distill_batch_size,
            learning_rate=self.distill_learning_rate,
            holdout_fraction=self.distill_holdout,
            seed=self.seed,
            context_config=context_config,
        )
