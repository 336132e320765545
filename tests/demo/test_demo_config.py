"""The build-demo config: presets, range checks, and which fields feed which stage."""

from __future__ import annotations

import dataclasses

import pytest

from gatemix.demo.config import STAGES, DemoConfig
from gatemix.demo.errors import DemoBuildError


def test_presets_build_valid_configs_and_take_overrides(tmp_path):
    full = DemoConfig.preset("full", out_dir=tmp_path)
    test = DemoConfig.preset("test", out_dir=tmp_path, seed=7)
    assert full.out_dir == str(tmp_path)
    assert test.seed == 7 and test.hidden_size < full.hidden_size
    assert test.monolithic_steps == test.base_steps + 3 * test.expert_steps


@pytest.mark.parametrize("overrides", [
    {"domains": ("code", "poetry")}, {"domains": ()}, {"eval_fraction": 0.0},
    {"vocab_size": 100}, {"seq_len": 4096}, {"num_heads": 3}, {"hidden_size": 64,
                                                                "num_heads": 4},
    {"num_kv_heads": 3}, {"base_steps": 0}, {"expert_learning_rate": 2.0},
])
def test_bad_values_are_demo_errors(tmp_path, overrides):
    with pytest.raises(DemoBuildError):
        DemoConfig.preset("test", out_dir=tmp_path, **overrides)


def test_unknown_preset_or_field_is_a_demo_error(tmp_path):
    with pytest.raises(DemoBuildError):
        DemoConfig.preset("huge", out_dir=tmp_path)
    with pytest.raises(DemoBuildError):
        DemoConfig.preset("test", out_dir=tmp_path, hidden=3)


def test_every_field_has_help_and_a_known_stage():
    for field in dataclasses.fields(DemoConfig):
        assert field.metadata["help"]
        assert field.metadata["stage"] in (*STAGES, "runtime")


def test_runtime_fields_feed_no_stage(tmp_path):
    config = DemoConfig.preset("test", out_dir=tmp_path)
    hashed = config.stage_settings(*STAGES)
    assert "out_dir" not in hashed and "num_threads" not in hashed
    assert "expert_steps" in config.stage_settings("experts")
    assert "expert_steps" not in config.stage_settings("base")
