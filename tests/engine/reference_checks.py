"""The engine against an independent reference mixture: top-k log-probs and greedy decodes.

A reference is anything with ``next_logprobs(token_ids, pin) -> (V,)`` (float64
log-probs of the next token; ``pin`` None for the served gate, else fixed weights):
the architecture tests' transformers mixture, the LoRA tests' peft mixture.
"""

from __future__ import annotations

from typing import Protocol

import torch
from vllm import SamplingParams

from gatemix.engine.request_gates import gate_request_args


class Reference(Protocol):
    def next_logprobs(self, token_ids: list[int], pin: list[float] | None) -> torch.Tensor: ...


def pinned_params(pin: list[float] | None, **kwargs) -> SamplingParams:
    """Sampling parameters whose request pins the gate to ``pin`` (None: the served gate)."""
    return SamplingParams(extra_args=gate_request_args(pinned_weights=pin) if pin else None, **kwargs)


def reference_greedy(reference: Reference, prompt: list[int], pin: list[float] | None, steps: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(steps):
        tokens.append(int(reference.next_logprobs(tokens, pin).argmax()))
    return tokens[len(prompt):]


def check_top_logprobs(llm, reference: Reference, prompts, pin, top: int = 20, atol: float = 1e-3) -> None:
    """The engine's top-``top`` next tokens are the reference's (one may swap at the edge), each within ``atol``."""
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                           pinned_params(pin, max_tokens=1, temperature=0.0, logprobs=top), use_tqdm=False)
    for prompt, output in zip(prompts, outputs):
        expected = reference.next_logprobs(prompt, pin)
        engine_top = output.outputs[0].logprobs[0]
        assert len(set(engine_top) & set(expected.topk(top).indices.tolist())) >= top - 1
        for token_id, logprob in engine_top.items():
            assert abs(logprob.logprob - expected[token_id].item()) < atol, (pin, token_id)


def check_greedy(llm, reference: Reference, prompts, pin, steps: int) -> None:
    """``steps`` greedy tokens of every prompt equal the reference's."""
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                           pinned_params(pin, max_tokens=steps, temperature=0.0, ignore_eos=True), use_tqdm=False)
    for prompt, output in zip(prompts, outputs):
        assert list(output.outputs[0].token_ids) == reference_greedy(reference, prompt, pin, steps), pin
