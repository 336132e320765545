"""Fixtures of the distillation tests: tiny runs on the tiny demo, and a composite whose gate has a lambda."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from distill_helpers import GATE_LAMBDA, TINY

from gatemix.distill.config import DistillConfig


@pytest.fixture
def tiny_config(demo_paths, composite_dir, tmp_path):
    """``tiny_config(**overrides)`` -> a DistillConfig writing under this test's tmp_path."""

    def make(**overrides) -> DistillConfig:
        values = {**TINY, "project": str(demo_paths.project_file),
                  "composite_dir": str(composite_dir), "out_dir": str(tmp_path / "student"),
                  "cache_dir": str(tmp_path / "cache")}
        return DistillConfig(**{**values, **overrides})

    return make


@pytest.fixture(scope="session")
def lambda_composite(demo_paths, tmp_path_factory) -> Path:
    """The demo experts packed with a constant gate whose artifact carries a fitted lambda."""
    from gatemix.engine.pack import pack_composite, parse_gate_spec
    from gatemix.expert_folder import read_expert

    experts = [read_expert(path, name) for name, path in demo_paths.expert_dirs.items()]
    artifact = parse_gate_spec("uniform", experts)
    artifact = dataclasses.replace(artifact, method="robust",
                                   details={"lambda_avg": [GATE_LAMBDA[e.name] for e in experts]})
    out = tmp_path_factory.mktemp("lambda") / "composite"
    pack_composite([e.path for e in experts], out, gate=artifact,
                   names=[e.name for e in experts])
    return out


@pytest.fixture(scope="session")
def tiny_student(demo_paths, composite_dir, tmp_path_factory) -> Path:
    """A student distilled for a few steps, for the serving and report tests."""
    from gatemix.distill.train import distill

    root = tmp_path_factory.mktemp("tiny-student")
    config = DistillConfig(**{**TINY, "steps": 6, "eval_every": 3, "checkpoint_every": 0,
                              "keep": "last"},
                           project=str(demo_paths.project_file), composite_dir=str(composite_dir),
                           out_dir=str(root / "student"), cache_dir=str(root / "cache"))
    return distill(config)

