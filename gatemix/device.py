"""Where the offline jobs run the experts, and in which dtype.

``fit-gate`` and ``distill`` run every expert forward over their data; on a GPU
machine that belongs on the GPU in bf16 (the experts' serving dtype), on a CPU
in fp32 (bf16 matmuls are slow on most CPUs, and the tests compare against
fp32). ``auto`` picks that; an explicit device or dtype is taken as given.
"""

from __future__ import annotations

import torch

from gatemix.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str = "auto") -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; ``cuda[:N]`` must exist."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"device {device!r} asked for, but torch sees no CUDA device")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise UserError(f"device {device!r} asked for, but torch sees {torch.cuda.device_count()} GPU(s)")
    elif device != "cpu":
        raise UserError(f"device must be auto, cpu or cuda[:N], got {device!r}")
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """``auto`` -> bf16 on a GPU, fp32 on the CPU."""
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if dtype not in DTYPES:
        raise UserError(f"dtype must be auto or one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]
