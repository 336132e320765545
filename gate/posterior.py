"""The posterior gate's state: each expert's running log-likelihood of the prefix.

For a constant sequence-level gate sigma, the gated model's next-token
conditional is exactly a per-token mixture whose weights are the posterior
``w_k(x_<=t) ∝ sigma_k pi_k(x_<=t)`` (the paper's ``pi_sigma``, served per
token; ``Z_sigma = 1`` for every sigma). The state is ``S_k(t) = sum_j
lambda^(t-j) log pi_k(x_j | x_<j)`` over the tokens seen so far; a forgetting
factor ``lambda < 1`` lets the posterior follow text that changes domain.

One function, shared by the offline fit (``HiddenStateRouter.forward``), the
distillation teacher and the engine (``engine/composite_model.py``), so the
served state is the fitted one.
"""

from __future__ import annotations

import torch

SCAN_BLOCK = 128  # tokens per block of the scan: a (B, B) decay matrix, carried across blocks


def forgetting_scan(
    token_logprobs: torch.Tensor, forgetting: torch.Tensor | float, initial: torch.Tensor | None = None
) -> torch.Tensor:
    """Inclusive scan ``S[t] = lambda * S[t-1] + lp[t]``, ``S[-1] = initial`` (default 0).

    Shapes: ``(..., T, K)`` log-probs, a scalar ``lambda`` in (0, 1], ``(..., K)``
    initial state -> ``(..., T, K)``. Differentiable in ``lambda``; computed in
    blocks so a long prefill never builds a ``T x T`` matrix.
    """
    forgetting = torch.as_tensor(forgetting, dtype=token_logprobs.dtype, device=token_logprobs.device)
    state = torch.zeros_like(token_logprobs[..., 0, :]) if initial is None else initial.to(token_logprobs)
    blocks = []
    for start in range(0, token_logprobs.shape[-2], SCAN_BLOCK):
        block = token_logprobs[..., start : start + SCAN_BLOCK, :]  # (..., B, K)
        steps = torch.arange(block.shape[-2], device=block.device, dtype=block.dtype)
        lags = steps[:, None] - steps[None, :]  # (B, B): i - j
        decay = torch.where(lags >= 0, forgetting ** lags.clamp_min(0), torch.zeros_like(lags))
        carried = forgetting ** (steps + 1)  # (B,): how much of the state before the block is left
        scanned = torch.einsum("ij,...jk->...ik", decay, block) + carried[:, None] * state.unsqueeze(-2)
        blocks.append(scanned)
        state = scanned[..., -1, :]
    return torch.cat(blocks, dim=-2) if blocks else token_logprobs.clone()


def final_state(token_logprobs: torch.Tensor, forgetting: torch.Tensor | float) -> torch.Tensor:
    """``forgetting_scan(lp, lambda)[-1]`` alone: ``S = sum_j lambda^(T-1-j) lp[j]``. ``(T, K) -> (K,)``.

    One weighted sum instead of a scan: what a request continuing from cached
    blocks needs of the whole cached prefix (``engine/prefix_state.py``).
    """
    forgetting = torch.as_tensor(forgetting, dtype=token_logprobs.dtype, device=token_logprobs.device)
    lags = torch.arange(token_logprobs.shape[0] - 1, -1, -1, device=token_logprobs.device, dtype=token_logprobs.dtype)
    return (forgetting**lags) @ token_logprobs


def prefix_state(next_logprobs: torch.Tensor, forgetting: torch.Tensor | float) -> torch.Tensor:
    """The state before each prediction, offline: ``S[t] = sum_{j<t} lambda^(t-1-j) lp[j]``.

    ``next_logprobs`` ``(N, T, K)`` holds ``log pi_k(x_{t+1} | x_<=t)`` at position t
    (``TokenFeatures.next_logprobs``, zero where masked), so the state at position
    t covers the tokens up to x_t: the exclusive scan. -> ``(N, T, K)``.
    """
    inclusive = forgetting_scan(next_logprobs, forgetting)
    return torch.cat([torch.zeros_like(inclusive[..., :1, :]), inclusive[..., :-1, :]], dim=-2)
