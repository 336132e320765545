"""What prefix caching needs of the posterior state, kept beside the KV cache: one side table per worker.

A posterior gate's state at position t is a scan over every earlier token's
expert log-probs (``gate/posterior.py``). A request that reuses cached KV blocks
never computes those tokens, so the engine keeps, for every KV **slot** (vLLM's
``block * block_size + offset``), the experts' log-probs of the token in it
``log pi_k(x_p | x_<p)`` ``(K,)``, and, for every **block**, the experts' final
hidden states at its last position ``(sum_k H_k,)``:

* **Valid exactly as long as the KV.** A slot's entry is written by the forward
  pass that writes the slot's KV (same ``slot_mapping``), so it is rewritten
  whenever vLLM recomputes the block, and a block vLLM serves from its prefix
  cache holds the entries of the tokens its hash names.
* **Gate-independent.** The table holds the experts' log-probs, not the gate's
  state, so a request continuing from cached blocks rebuilds its state by
  scanning them with its own gate's forgetting factor: a gate swapped while
  serving (``gate_versions``) needs no cache flush.
* **The first uncached token** ``x_n`` needs the experts' distributions at
  ``n - 1``, the last cached position: the block's stored hidden states go
  through each expert's own ``compute_logits`` once (one row per hit request).

Why a side table and not vLLM's per-block state caching for hybrid models
(``MambaBase``, ``mamba_cache_mode="all"``): that path makes the composite a
hybrid model, which vLLM 0.32 cannot start with speculative decoding (vLLM
issue #57721), and it keeps a state per block, which would tie the cache to one
gate's forgetting factor. The side table is keyed by the same slots and blocks
as the KV cache and costs ``K`` floats per slot plus one hidden row per block,
about a percent of the KV cache it shadows.

With speculative decoding (``--draft``) the table needs nothing more: a request
rolls its state back from its last chunk (``PrefixState.roll_back``), a rejected
draft token's slot is rewritten by the forward pass that recomputes that
position, and vLLM caches only blocks of accepted tokens.
"""

from __future__ import annotations

import torch

PAD_SLOT = -1  # vLLM's slot id for padding tokens (``PAD_SLOT_ID``)


class SlotLogprobs:
    """``token_logprobs`` ``(num_slots + 1, K)`` and ``block_hidden`` ``(num_blocks + 1, H)``; the last rows are scratch."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size  # vLLM's KV-manager block size: prefix-cache hits end on its multiples
        self.token_logprobs: torch.Tensor | None = None
        self.block_hidden: torch.Tensor | None = None
        self.kernel_block_size: int | None = None  # the block table's unit (vLLM may split blocks for kernels)

    def ensure(self, num_blocks: int, num_experts: int, hidden: torch.Tensor) -> None:
        """Allocate once, when the KV cache's size is known (the first forward pass with requests)."""
        if self.token_logprobs is not None:
            return
        self.token_logprobs = torch.zeros(num_blocks * self.block_size + 1, num_experts, device=hidden.device)
        self.block_hidden = hidden.new_zeros(num_blocks + 1, hidden.shape[-1])

    def write(
        self, slot_mapping: torch.Tensor, positions: torch.Tensor, token_logprobs: torch.Tensor,
        expert_hidden: torch.Tensor, num_tokens: torch.Tensor,
    ) -> None:
        """Record a forward pass's ``(T, K)`` log-probs, padding included, without a host sync.

        ``num_tokens``: a 0-d tensor, the real tokens; the rest, and vLLM's
        padding slots, go to the scratch slot (whose block is the scratch block).
        """
        count = min(token_logprobs.shape[0], slot_mapping.shape[0])
        slots = slot_mapping[:count].long()
        real = (torch.arange(count, device=slots.device) < num_tokens) & (slots != PAD_SLOT)
        scratch_slot = self.token_logprobs.shape[0] - 1
        self.write_rows(
            torch.where(real, slots, scratch_slot), positions[:count], token_logprobs[:count], expert_hidden[:count]
        )

    def write_rows(self, slots: torch.Tensor, positions: torch.Tensor, token_logprobs: torch.Tensor,
                   expert_hidden: torch.Tensor) -> None:
        """Record ``R`` tokens' log-probs per slot and, at a block's last position, the hidden states.

        Every slot must be real or the scratch slot (a decode step's rows are
        all real: it calls this directly). Tokens not at a block end write
        their hidden states to the scratch block.
        """
        slots = slots.long()
        self.token_logprobs[slots] = token_logprobs.float()
        scratch_block = self.block_hidden.shape[0] - 1
        blocks = torch.where((positions + 1) % self.block_size == 0, slots // self.block_size, scratch_block)
        self.block_hidden.index_copy_(0, blocks, expert_hidden.to(self.block_hidden))

    def prefix_slots(self, block_row: torch.Tensor, length: int, first_slot: int) -> torch.Tensor:
        """``(length,)`` slots of positions ``0 .. length - 1`` of the request whose block table row is ``block_row``.

        ``first_slot``: the slot vLLM gave position ``length`` in this forward,
        which tells the block table's unit (once per process).
        """
        unit = self.kernel_block_size or self._kernel_block_size(block_row, length, first_slot)
        blocks = block_row[: -(-length // unit)].long()  # ceil(length / unit) blocks
        offsets = torch.arange(unit, device=blocks.device)
        return (blocks[:, None] * unit + offsets[None, :]).flatten()[:length]

    def _kernel_block_size(self, block_row: torch.Tensor, length: int, first_slot: int) -> int:
        """The block table's unit: the manager's block size, or a divisor of it vLLM split it into."""
        unit = self.block_size
        while unit >= 1:
            if int(block_row[length // unit]) * unit + length % unit == first_slot:
                self.kernel_block_size = unit
                return unit
            unit //= 2
        raise RuntimeError(f"the block table does not map position {length} to its slot {first_slot}")

    def hidden_before(self, slots: torch.Tensor) -> torch.Tensor:
        """``(R, H)`` hidden states stored for the blocks ending at these slots."""
        return self.block_hidden[slots.long() // self.block_size]
