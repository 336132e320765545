"""The model names the server answers to, and what each one asks of the gate.

A composite folder serves K + 1 names: the ensemble's (the gated mixture) and
each expert's (that expert alone, as a one-hot pinned gate in the same engine).
A plain single-model folder serves one name, reported as a one-expert mixture.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

from gatemix.server.errors import bad_request, model_not_found
from gatemix.server.protocol import DraftCard, GateCard, MixtureRequest, ModelCard, ModelList


@dataclass(frozen=True)
class GatePlan:
    """One request's gate: what goes into ``gate_request_args`` and the report."""

    model: str  # the name the client asked for
    pinned_weights: list[float] | None  # (K,) expert order, or None: the gate decides
    expert_mask: list[bool] | None  # (K,) or None: all experts
    per_token: bool
    gate_version: str | None = None  # the gate served when the request arrived: its report says so


@dataclass(frozen=True)
class ServedModels:
    ensemble_name: str
    expert_names: list[str]  # expert order (K); [ensemble_name] for a plain folder
    gate_version: str | None
    gate_loaded_at: float
    is_composite: bool
    root: str
    gate_method: str | None = None
    gate_report: str | None = None  # the fit's report.md, when the served artifact has one
    draft: DraftCard | None = None  # the engine's draft model (--draft), for every name

    @classmethod
    def from_folder(
        cls, model_dir: str | Path, served_model_name: str | None = None
    ) -> ServedModels:
        model_dir = Path(model_dir)
        name = served_model_name or model_dir.resolve().name
        # composite_folder imports torch (seconds): the names and plans are testable without it.
        from gatemix.engine.composite_folder import CompositeInfo, is_composite_folder

        if not is_composite_folder(model_dir):
            return cls(name, [name], None, time.time(), False, str(model_dir))

        info = CompositeInfo.read(model_dir)
        if name in info.expert_names:
            raise ValueError(f"served model name {name!r} clashes with an expert's name")
        return cls(
            name, info.expert_names, info.gate_version, time.time(), True, str(model_dir),
            gate_method=info.gate_method,
        )

    def with_gate(self, version: str, method: str, report: str | None) -> ServedModels:
        """The same names, serving another gate from now on (a hot reload)."""
        return dataclasses.replace(
            self, gate_version=version, gate_method=method, gate_report=report, gate_loaded_at=time.time()
        )

    def with_draft(self, draft: str | None, num_draft_tokens: int) -> ServedModels:
        card = None if draft is None else DraftCard(model=str(draft), num_draft_tokens=num_draft_tokens)
        return dataclasses.replace(self, draft=card)

    def gate_card(self) -> GateCard | None:
        if self.gate_version is None:
            return None
        return GateCard(
            version=self.gate_version, method=self.gate_method or "unknown",
            loaded_at=self.gate_loaded_at, report=self.gate_report,
        )

    def model_list(self) -> ModelList:
        cards = [
            ModelCard(id=self.ensemble_name, root=self.root, experts=list(self.expert_names), gate=self.gate_card(),
                      draft=self.draft)
        ]
        if self.is_composite:
            cards += [
                ModelCard(id=name, root=self.root, experts=[name], draft=self.draft) for name in self.expert_names
            ]
        return ModelList(data=cards)

    def model_card(self, model: str) -> ModelCard:
        """``GET /v1/models/{model}``: the same card as in ``model_list``, or a 404 naming it."""
        card = next((card for card in self.model_list().data if card.id == model), None)
        if card is None:
            raise model_not_found(model)
        return card

    def plan(self, model: str | None, mixture: MixtureRequest | None) -> GatePlan:
        """Resolve the model name and validate the ``mixture`` extension (400/404 on bad input)."""
        model = model or self.ensemble_name
        per_token = bool(mixture and mixture.per_token)
        if model == self.ensemble_name:
            pinned = (
                self._pinned_weights(mixture.weights)
                if mixture and mixture.weights is not None
                else None
            )
            mask = (
                self._expert_mask(mixture.experts)
                if mixture and mixture.experts is not None
                else None
            )
            if (
                pinned is not None
                and mask is not None
                and not any(w > 0 for w, m in zip(pinned, mask) if m)
            ):
                raise bad_request(
                    "the pinned weights give no weight to the chosen experts", "mixture"
                )
            if not self.is_composite:  # one model: nothing to pin or restrict
                pinned = mask = None
            return GatePlan(model, pinned, mask, per_token, self.gate_version)
        if self.is_composite and model in self.expert_names:
            if mixture and (mixture.weights is not None or mixture.experts is not None):
                raise bad_request(
                    f"`mixture` weights and experts apply to the ensemble `{self.ensemble_name}`, "
                    f"not to the expert `{model}`",
                    "mixture",
                )
            one_hot = [1.0 if name == model else 0.0 for name in self.expert_names]
            return GatePlan(model, one_hot, None, per_token, self.gate_version)
        raise model_not_found(model)

    def _pinned_weights(self, weights: dict[str, float]) -> list[float]:
        unknown = sorted(set(weights) - set(self.expert_names))
        if unknown:
            raise bad_request(
                f"mixture.weights names unknown experts {unknown}; experts are {self.expert_names}",
                "mixture.weights",
            )
        values = [float(weights.get(name, 0.0)) for name in self.expert_names]
        if any(not math.isfinite(w) or w < 0 for w in values):
            raise bad_request("mixture.weights must be finite and non-negative", "mixture.weights")
        largest = max(values)
        if not largest > 0:
            raise bad_request("mixture.weights must have a positive sum", "mixture.weights")
        scaled = [w / largest for w in values]  # the sum of two huge weights is not inf
        total = sum(scaled)
        return [w / total for w in scaled]

    def _expert_mask(self, experts: list[str]) -> list[bool]:
        unknown = sorted(set(experts) - set(self.expert_names))
        if unknown:
            raise bad_request(
                f"mixture.experts names unknown experts {unknown}; experts are {self.expert_names}",
                "mixture.experts",
            )
        if not experts:
            raise bad_request("mixture.experts must name at least one expert", "mixture.experts")
        return [name in experts for name in self.expert_names]
