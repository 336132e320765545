"""A micro demo build (seconds, not minutes) shared by the demo tests."""

from __future__ import annotations

import os

import pytest

# Before torch loads libgomp: on a busy machine, spinning OpenMP workers make
# two-thread training up to 25x slower than one thread; passive waiting does not.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from gatemix.demo.build import build_demo
from gatemix.demo.config import DemoConfig
from gatemix.demo.paths import DemoPaths

# Tiny enough that the whole pipeline runs in a few seconds; one thread because
# tiny matmuls only pay two threads' synchronization cost on a busy machine.
MICRO_OVERRIDES = {
    "max_docs_per_domain": 12, "max_chars_per_doc": 1500, "vocab_size": 320,
    "context_length": 64, "hidden_size": 32, "num_layers": 1, "num_heads": 1,
    "num_kv_heads": 1, "intermediate_size": 64, "seq_len": 32, "batch_size": 4,
    "warmup_steps": 1, "base_steps": 4, "expert_steps": 2, "mono_hidden_size": 64,
    "mono_num_layers": 1, "mono_num_heads": 2, "mono_num_kv_heads": 1,
    "mono_intermediate_size": 64, "eval_max_tokens": 256, "num_threads": 1, "progress": False,
    "ood_max_docs": 4, "gate_steps": 20,
}


def micro_config(out_dir, **overrides) -> DemoConfig:
    return DemoConfig.preset("test", out_dir=out_dir, **{**MICRO_OVERRIDES, **overrides})


@pytest.fixture(scope="session")
def make_micro_config():
    """``make_micro_config(out_dir, **overrides)`` -> a micro ``DemoConfig``."""
    return micro_config


@pytest.fixture(scope="session")
def micro_demo(tmp_path_factory) -> DemoPaths:
    """Built once per session; tests that modify a demo copy it first."""
    return build_demo(micro_config(tmp_path_factory.mktemp("micro-demo")))
