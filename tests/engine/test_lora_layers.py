"""The LoRA experts' stacked update on tiny tensors: K blocks of rows, each its own adapter's projection."""

from __future__ import annotations

import torch
from torch import nn

from gatemix.adapter_folder import LoRAFactor
from gatemix.engine.lora_layers import ExpertsLoRALinear, stack_factors


class _PlainLinear(nn.Module):
    """vLLM's linear-layer contract: ``x -> (x W^T + b, None)``."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.weight, self.bias = nn.Parameter(weight), nn.Parameter(bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return x @ self.weight.T + self.bias, None


def _factor(rank: int, in_size: int, out_size: int, scale: float) -> LoRAFactor:
    return LoRAFactor(a=torch.randn(rank, in_size, dtype=torch.float64),
                      b=torch.randn(out_size, rank, dtype=torch.float64), scale=scale)


def test_each_block_of_rows_gets_its_own_adapters_update_on_a_stacked_projection():
    torch.manual_seed(0)
    num_tokens, in_size, out_sizes = 5, 16, [8, 4, 4]  # a q/k/v projection: three modules stacked
    per_expert = [
        [_factor(2, in_size, 8, 2.0), _factor(2, in_size, 4, 2.0), _factor(2, in_size, 4, 2.0)],  # q, k, v
        [None, _factor(3, in_size, 4, 0.5), None],  # k only, another rank
        [None, None, None],  # the base itself
    ]
    weight, bias = torch.randn(sum(out_sizes), in_size, dtype=torch.float64), torch.randn(sum(out_sizes), dtype=torch.float64)
    lora_a, lora_b = stack_factors(per_expert, out_sizes, in_size)
    assert lora_a.shape == (3, in_size, 6) and lora_b.shape == (3, 6, sum(out_sizes))
    layer = ExpertsLoRALinear(_PlainLinear(weight, bias), lora_a.double(), lora_b.double())
    rows = torch.randn(len(per_expert) * num_tokens, in_size, dtype=torch.float64)
    output, output_bias = layer(rows)
    assert output_bias is None
    for k, factors in enumerate(per_expert):
        x = rows[k * num_tokens : (k + 1) * num_tokens]
        updates = [
            torch.zeros(num_tokens, width, dtype=torch.float64) if factor is None
            else factor.scale * (x @ factor.a.T) @ factor.b.T
            for factor, width in zip(factors, out_sizes)
        ]
        expected = x @ weight.T + bias + torch.cat(updates, dim=-1)
        torch.testing.assert_close(output[k * num_tokens : (k + 1) * num_tokens], expected, rtol=1e-5, atol=1e-5)


def test_a_projection_no_expert_adapts_is_left_alone():
    assert stack_factors([[None, None], [None, None]], [4, 4], 8) is None
