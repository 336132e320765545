"""The ensemble as a teacher, computed offline with ``transformers``.

It runs the same function as the engine's composite model: every expert on the
sequence, the router on the concatenated final hidden states, the exact
mixture. It is also how tests compare the offline router with the engine's
per-token weights.

The experts may be any Hugging Face causal-LM architecture, on any device and
in any dtype; the router stays in float32 (it is small and decides the gate),
and the mixture is computed in float32 whatever the experts' dtype. Nothing
here imports vLLM (``composite_folder`` is the format alone, plain Python), so
the teacher runs on a machine with no engine at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from gatemix.engine.composite_folder import GATE_SUBDIR, CompositeInfo
from gatemix.expert_models import Expert, as_experts, load_expert_models
from gatemix.gate.artifact import load_router
from gatemix.gate.mixing import mix_logits
from gatemix.gate.router import HiddenStateRouter


class EnsembleTeacher:
    def __init__(
        self,
        experts: list,
        router: HiddenStateRouter,
        expert_names: list[str],
        *,
        device: str | torch.device = "cpu",
    ) -> None:
        """``experts`` and ``router`` must already be on ``device``."""
        self.experts = experts
        self.router = router
        self.expert_names = expert_names
        self.device = torch.device(device)

    @classmethod
    def load(
        cls,
        composite_dir: str | Path,
        expert_dirs: Sequence[Expert],
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> EnsembleTeacher:
        """The router from a composite folder; the experts from their own folders (or a project's
        ``expert_folders()``: LoRA adapters load over one base), in its order."""
        info = CompositeInfo.read(composite_dir)
        if len(expert_dirs) != len(info.expert_names):
            raise ValueError(
                f"{len(expert_dirs)} expert folders for {len(info.expert_names)} experts"
            )
        router = load_router(Path(composite_dir) / GATE_SUBDIR).router
        return cls.from_experts(
            expert_dirs, router, expert_names=info.expert_names, device=device, dtype=dtype
        )

    @classmethod
    def from_experts(
        cls,
        expert_dirs: Sequence[Expert],
        router: HiddenStateRouter,
        *,
        expert_names: list[str] | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> EnsembleTeacher:
        """Expert folders and a router in hand, no composite folder.

        The router is moved to ``device`` in float32 in place (``Module.to``);
        pass a copy to keep the original where it is.
        """
        if len(expert_dirs) != router.form.num_experts:
            raise ValueError(
                f"{len(expert_dirs)} expert folders for a router of {router.form.num_experts}"
            )
        items = as_experts(expert_dirs)
        experts = load_expert_models(items, device=str(device), dtype=dtype)
        router = router.to(device=device, dtype=torch.float32).eval().requires_grad_(False)
        names = expert_names or [item.name for item in items]  # a Path's name is its folder's
        return cls(experts, router, list(names), device=device)

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, T)`` ids -> mixture log-probs ``(B, T, V)`` and log gate weights ``(B, T, K)``.

        Both float32, on the teacher's device (the ids are moved there).
        """
        input_ids = input_ids.to(self.device)
        hidden, logits = [], []
        for expert in self.experts:
            # The causal LM's own forward, not ``model`` + ``lm_head``: some
            # architectures scale or soft-cap their logits there.
            out = expert(input_ids=input_ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-1].float())  # (B, T, H), after the final norm
            logits.append(out.logits)  # (B, T, V)
        expert_logits = torch.stack(logits, dim=-2)  # (B, T, K, V)
        next_logprobs = None
        if self.router.form.posterior:  # log pi_k(x_{t+1} | x_<=t); the last position has no next token
            scored = torch.log_softmax(expert_logits[:, :-1].float(), -1).gather(
                -1, input_ids[:, 1:, None, None].expand(-1, -1, expert_logits.shape[2], 1)
            ).squeeze(-1)  # (B, T-1, K)
            next_logprobs = torch.cat([scored, scored.new_zeros(scored[:, :1].shape)], dim=1)
        log_weights = self.router(torch.cat(hidden, dim=-1), input_ids, None, next_logprobs)  # (B, T, K)
        return mix_logits(expert_logits, log_weights), log_weights
