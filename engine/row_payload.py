"""What the composite's ``forward`` appends to each token's hidden state for ``compute_logits``.

vLLM hands ``compute_logits`` the hidden states of the rows it samples (or
scores for prompt logprobs), gathered from ``forward``'s output, and nothing
else: not which token of the pass each row was, nor its request. So ``forward``
appends to every token, after the experts' ``(sum_k H_k)`` hidden states:

* its log gate weights ``(K,)``, as a (high, low) pair in the model's dtype, so
  half-precision models keep ~16 bits of precision in the weights (``2K`` columns);
* with a draft only, its index in the forward pass, in base-256 digits, exact
  in bf16 and fp16 (``TOKEN_INDEX_DIGITS`` columns). With a draft, vLLM samples
  several rows per request (every verified position); the index says which
  token, hence which request and position, each row is. Without one, row i of
  the sampling call is batch row i, and the columns would be dead weight.
"""

from __future__ import annotations

import torch

from gatemix.gate.mixing import LOG_WEIGHT_FLOOR

TOKEN_INDEX_DIGITS = 3  # base 256: forward passes of up to 16.7M tokens
_DIGIT_BASE = 256


def encode_log_weights(log_weights: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(T, K)`` float32 -> (high, low) in ``dtype``, with ``high + low`` ~ the input."""
    log_weights = log_weights.float().clamp_min(LOG_WEIGHT_FLOOR)
    high = log_weights.to(dtype)
    low = (log_weights - high.float()).to(dtype)
    return high, low


def decode_log_weights(packed: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Inverse of ``encode_log_weights``: ``(N, 2K)`` -> ``(N, K)`` float32."""
    return packed[:, :num_experts].float() + packed[:, num_experts:].float()


def encode_token_index(num_tokens: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``(T, TOKEN_INDEX_DIGITS)``: each token's index ``0..T-1`` in base-256 digits, lowest first."""
    index = torch.arange(num_tokens, device=device)
    digits = [(index // _DIGIT_BASE**d) % _DIGIT_BASE for d in range(TOKEN_INDEX_DIGITS)]
    return torch.stack(digits, dim=-1).to(dtype)


def decode_token_index(digits: torch.Tensor) -> torch.Tensor:
    """Inverse of ``encode_token_index``: ``(N, TOKEN_INDEX_DIGITS)`` -> ``(N,)`` int64."""
    scale = torch.tensor([_DIGIT_BASE**d for d in range(TOKEN_INDEX_DIGITS)], device=digits.device)
    return (digits.round().long() * scale).sum(-1)

