"""The fit's evaluation on the project's eval split: the robust router against every baseline."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from gatemix.gate.config import FitGateConfig
from gatemix.gate.distill_router import TokenFeatures
from gatemix.gate.evaluate import compare_to_baselines, evaluate_methods, write_report
from gatemix.gate.features import HFExpertBank
from gatemix.gate.fit import (
    FitInputs,
    fit_router_directly,
    in_domain_cross_entropy,
    load_split_features,
    primal_dual_part,
    proportions,
)
from gatemix.gate.mixing import mix_sequence_logprobs
from gatemix.gate.primal_dual import GateFitData
from gatemix.gate.registry import GATES
from gatemix.gate.router import HiddenStateRouter
from gatemix.gate.sequence_gate import SequenceGate


@torch.no_grad()
def sequence_gate_token_logprobs(gate: SequenceGate, features: TokenFeatures) -> torch.Tensor:
    """The non-causal gate's ``log pi_g(x)`` spread evenly over the scored tokens. -> (N, T-1)."""
    log_gate = gate(features.input_ids, features.attention_mask)
    sequence = mix_sequence_logprobs(features.sequence_logprobs(), log_gate)  # (N,)
    per_token = sequence / features.num_tokens().clamp_min(1)
    return per_token.unsqueeze(1) * features.token_mask


@torch.no_grad()
def model_token_logprobs(
    model_dir: Path, features: dict[str, TokenFeatures]
) -> dict[str, torch.Tensor]:
    """One extra model (the monolithic one) scored on the same token ids."""
    bank = HFExpertBank([model_dir])
    bank.with_hidden = False
    return {
        domain: bank.score(part.input_ids, part.attention_mask).next_logprobs[..., 0]
        for domain, part in features.items()
    }


def evaluate_fit(
    config: FitGateConfig,
    inputs: FitInputs,
    routers: dict[str, HiddenStateRouter],
    served: str,
    gate: SequenceGate,
    work_dir: Path,
) -> dict:
    """Fit the ERM router, score it with every robust router and baseline, write ``report.md``.

    ``robust_router`` is the served one (``routers[served]``); the two-stage
    router and the direct one also appear under their own names.
    """
    bank, domains, data = inputs.bank, inputs.domains, inputs.data
    bank.with_hidden = True
    eval_features = load_split_features(bank, config, inputs.project, "eval")
    gate_features_ce = in_domain_cross_entropy(
        {d: _domain_slice(data, j) for j, d in enumerate(domains)}
    )
    base = primal_dual_part(config)
    router = routers[served]
    erm_router, _ = fit_router_directly(
        data,
        router.form,
        dataclasses.replace(
            base, fixed_lambda=proportions(data), loss="cross_entropy", checkpoint_every=0
        ),
    )
    gates = {
        "uniform": GATES["uniform"](len(domains)),
        "posterior": GATES["posterior"](),
        "robust_constant": GATES["robust_constant"](gate_features_ce),
        "erm": GATES["learned"](erm_router),
        "robust_router": GATES["learned"](router),
    }
    gates["two_stage_router"] = GATES["learned"](routers["two_stage"])
    if "direct" in routers:
        gates["direct_robust_router"] = GATES["learned"](routers["direct"])
    extra = {
        "sequence_gate (not causal)": {
            d: sequence_gate_token_logprobs(gate, f) for d, f in eval_features.items()
        }
    }
    for name, model_dir in inputs.project.baselines.items():  # the project's [baselines]
        extra[name] = model_token_logprobs(model_dir, eval_features)
    report = evaluate_methods(eval_features, gates, extra, seed=config.seed)
    report.notes = [f"robust_router is the served router: the {served} one"]
    report.notes += compare_to_baselines(report, "robust_router")
    if "direct_robust_router" in report.methods:
        report.notes += [
            note.replace("beats two_stage_router", "(ablation) beats the two-stage router")
            for note in compare_to_baselines(report, "two_stage_router", ("direct_robust_router",))
            if "beats" in note
        ] or ["the two-stage router beats or ties the direct one (ablation) on both worst cases"]
    write_report(
        report,
        work_dir,
        title="Robust gate: evaluation on the eval split",
        plots={"lambda, mu and Z over the primal-dual iterations": "primal_dual.png"},
    )
    (work_dir / "evaluation.json").write_text(json.dumps(report.to_dict(), indent=2))
    return {
        name: {
            "cross_entropy": dict(zip(domains, score.cross_entropy)),
            "excess": dict(zip(domains, score.excess)),
            "dirichlet_worst": score.dirichlet_worst,
            "dirichlet_p90": score.dirichlet_p90,
        }
        for name, score in report.methods.items()
    }


def _domain_slice(data: GateFitData, domain: int) -> TokenFeatures:
    rows = data.tensors["domain"] == domain
    tensors = data.tensors
    return TokenFeatures(
        tensors["input_ids"][rows],
        tensors["attention_mask"][rows],
        tensors["next_logprobs"][rows],
        None,
        tensors["token_mask"][rows],
    )
