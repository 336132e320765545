"""The frozen experts as the fit sees them: score sequences, sample from one expert.

``ExpertBank`` is the protocol the fit's sampling and router fit need;
``HFExpertBank`` is K Hugging Face causal LMs behind it (the synthetic
experiment has its own). Scoring returns each expert's log-prob of every next
token and, when asked (``with_hidden``), each expert's final hidden state
(after the final norm: ``hidden_states[-1]`` in transformers), which is what
the engine feeds the router.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from gatemix.expert_models import Expert, as_experts, load_expert_models, model_dir, weights_hash
from gatemix.gate.token_features import TokenFeatures


class ExpertBank(Protocol):
    """The frozen experts, as the fit and the router fit need them."""

    num_experts: int
    hidden_sizes: list[int]  # each expert's final hidden size, in expert order

    def score(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, with_hidden: bool = True
    ) -> TokenFeatures: ...

    def sample(
        self, expert: int, num: int, length: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


class HFExpertBank:
    """K Hugging Face causal LMs sharing one tokenizer, behind the ``ExpertBank`` protocol."""

    def __init__(
        self,
        experts: Sequence[Expert],
        *,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        models: Sequence | None = None,
    ) -> None:
        """``models``: the experts already loaded (a distillation teacher's), so that a job scoring
        with both holds one copy of the weights; else they are loaded here."""
        # transformers is deferred: importing it takes seconds, and the fit's modules
        # are imported by ``gatemix fit-gate --help`` and by tests that load no model.
        from transformers import AutoTokenizer

        experts = as_experts(experts)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir(experts[0]))
        # Full folders, or LoRA adapters over one base held once (``gatemix.expert_models``).
        self.models = list(models) if models is not None else load_expert_models(experts, device=device, dtype=dtype)
        if len(self.models) != len(experts):
            raise ValueError(f"{len(self.models)} loaded models for {len(experts)} experts")
        self.device = device
        self.dtype = dtype
        self.num_experts = len(self.models)
        self.hidden_sizes = [model.config.hidden_size for model in self.models]
        self.hashes = [weights_hash(expert) for expert in experts]

    def tokenize(self, texts: list[str], max_length: int) -> list[list[int]]:
        """Every text cut into windows of at most ``max_length`` tokens, each led by BOS.

        Whole documents, not their first window only: the demo's documents run
        to thousands of tokens, and truncation would throw most of each split away.
        """
        encoded = self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
        start = self._start_token()
        step = max_length - 1
        windows = []
        for ids in encoded:
            for offset in range(0, len(ids), step):
                window = [start, *ids[offset : offset + step]]
                if len(window) >= 2:  # a sequence needs one scored token
                    windows.append(window)
        return windows

    def token_stream(self, texts: list[str]) -> list[int]:
        """The texts' tokens joined into one stream, each document followed by EOS (when there is one)."""
        encoded = self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
        eos = self.tokenizer.eos_token_id
        stream: list[int] = []
        for ids in encoded:
            stream += ids if eos is None else [*ids, int(eos)]
        return stream

    def start_token(self) -> int:
        return self._start_token()

    def _start_token(self) -> int:
        for token in (self.tokenizer.bos_token_id, self.tokenizer.eos_token_id, 0):
            if token is not None:
                return int(token)
        return 0

    @torch.no_grad()
    def score(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, with_hidden: bool = True
    ) -> TokenFeatures:
        """Every expert's next-token log-probs and, ``with_hidden``, its final hidden states."""
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        logprobs, hidden = [], []
        for model in self.models:
            out = model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                output_hidden_states=with_hidden,
            )
            token_logprobs = torch.log_softmax(out.logits[:, :-1].float(), -1)
            logprobs.append(token_logprobs.gather(-1, input_ids[:, 1:, None]))  # (B, T-1, 1)
            if with_hidden:
                hidden.append(out.hidden_states[-1][:, :-1].float())  # (B, T-1, H)
        token_mask = (attention_mask[:, 1:] * attention_mask[:, :-1]).float().cpu()
        next_logprobs = torch.cat(logprobs, -1).cpu().masked_fill(token_mask[..., None] == 0, 0.0)
        return TokenFeatures(
            input_ids.cpu(),
            attention_mask.cpu(),
            next_logprobs,
            torch.cat(hidden, -1).cpu() if with_hidden else None,
            token_mask,
        )

    @torch.no_grad()
    def sample(
        self, expert: int, num: int, length: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Ancestral samples at temperature 1 from one expert; tokens after EOS are masked."""
        model = self.models[expert]
        input_ids = torch.full((num, 1), self._start_token(), device=self.device)
        out = model(input_ids=input_ids, use_cache=True)
        for _ in range(length):
            probs = torch.softmax(out.logits[:, -1].double().cpu(), -1)
            next_ids = torch.multinomial(probs, 1, generator=generator).to(self.device)
            input_ids = torch.cat([input_ids, next_ids], 1)
            out = model(input_ids=next_ids, past_key_values=out.past_key_values, use_cache=True)
        attention_mask = torch.ones_like(input_ids)
        eos = self.tokenizer.eos_token_id
        if eos is not None:
            is_eos = (input_ids[:, 1:] == eos).long()
            after_eos = (is_eos.cumsum(1) - is_eos) > 0  # strictly after the first EOS
            attention_mask[:, 1:] = (~after_eos).long()
        return input_ids.cpu(), attention_mask.cpu()


def pad_sequences(
    token_lists: list[list[int]], pad_id: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``(N, T)`` ids and mask."""
    width = max(len(ids) for ids in token_lists)
    input_ids = torch.full((len(token_lists), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(token_lists), width), dtype=torch.long)
    for row, ids in enumerate(token_lists):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
    return input_ids, attention_mask


