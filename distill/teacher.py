"""The ensemble as a teacher, computed offline with ``transformers``.

It runs the same function as the engine's composite model: every expert on the
sequence, the router on the concatenated final hidden states, the exact
mixture. It is also how tests compare the offline router with the engine's
per-token weights.
"""

from __future__ import annotations

from pathlib import Path

import torch

from gatemix.engine.composite_folder import GATE_SUBDIR, CompositeInfo
from gatemix.gate.artifact import load_router
from gatemix.gate.mixing import mix_logits
from gatemix.gate.router import HiddenStateRouter


class EnsembleTeacher:
    def __init__(self, experts: list, router: HiddenStateRouter, expert_names: list[str]) -> None:
        self.experts = experts
        self.router = router
        self.expert_names = expert_names

    @classmethod
    def load(cls, composite_dir: str | Path, expert_dirs: list[str | Path]) -> EnsembleTeacher:
        from transformers import LlamaForCausalLM

        info = CompositeInfo.read(composite_dir)
        if len(expert_dirs) != len(info.expert_names):
            raise ValueError(f"{len(expert_dirs)} expert folders for {len(info.expert_names)} experts")
        artifact = load_router(Path(composite_dir) / GATE_SUBDIR)
        experts = [LlamaForCausalLM.from_pretrained(d, dtype=torch.float32).eval() for d in expert_dirs]
        for model in experts:
            model.requires_grad_(False)
        return cls(experts, artifact.router.eval().requires_grad_(False), info.expert_names)

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, T)`` ids -> mixture log-probs ``(B, T, V)`` and log gate weights ``(B, T, K)``."""
        hidden, logits = [], []
        for expert in self.experts:
            last_hidden = expert.model(input_ids=input_ids).last_hidden_state  # (B, T, H), after the final norm
            hidden.append(last_hidden)
            logits.append(expert.lm_head(last_hidden))
        log_weights = self.router(torch.cat(hidden, dim=-1).float(), input_ids)  # (B, T, K)
        return mix_logits(torch.stack(logits, dim=-2), log_weights), log_weights
