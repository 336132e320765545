"""Compiled mixing is configuration: it reaches the composite as vLLM's ``additional_config``."""

from __future__ import annotations

from gatemix.engine.composite_folder import COMPILE_MIXING_KEY
from gatemix.engine.engine_config import COMPILE_MIXING_ENV, EngineSettings, engine_kwargs


def test_compile_mixing_reaches_the_composite_through_additional_config(composite_dir, monkeypatch):
    monkeypatch.delenv(COMPILE_MIXING_ENV, raising=False)
    assert "additional_config" not in engine_kwargs(composite_dir, EngineSettings())
    compiled = engine_kwargs(composite_dir, EngineSettings(compile_mixing=True))
    assert compiled["additional_config"] == {COMPILE_MIXING_KEY: True}


def test_the_readmes_environment_switch_still_compiles_mixing(composite_dir, monkeypatch):
    monkeypatch.setenv(COMPILE_MIXING_ENV, "1")
    assert engine_kwargs(composite_dir, EngineSettings())["additional_config"] == {COMPILE_MIXING_KEY: True}


def test_auto_dtype_keeps_an_fp32_checkpoint_on_a_cpu_without_native_bf16(composite_dir, monkeypatch, caplog):
    from gatemix.engine import engine_config

    monkeypatch.setattr(engine_config, "on_cpu", lambda: True)
    monkeypatch.setattr(engine_config, "cpu_has_native_bf16", lambda: False)
    assert engine_config.checkpoint_dtype(composite_dir) == "float32"
    with caplog.at_level("INFO", logger=engine_config.__name__):
        assert engine_kwargs(composite_dir, EngineSettings())["dtype"] == "float32"
    assert "no native bf16" in caplog.text
    assert engine_kwargs(composite_dir, EngineSettings(dtype="bfloat16"))["dtype"] == "bfloat16"


def test_auto_dtype_stays_vllms_where_bf16_is_native_or_on_a_gpu(composite_dir, monkeypatch):
    from gatemix.engine import engine_config

    monkeypatch.setattr(engine_config, "on_cpu", lambda: True)
    monkeypatch.setattr(engine_config, "cpu_has_native_bf16", lambda: True)
    assert engine_kwargs(composite_dir, EngineSettings())["dtype"] == "auto"
    monkeypatch.setattr(engine_config, "on_cpu", lambda: False)
    monkeypatch.setattr(engine_config, "cpu_has_native_bf16", lambda: False)
    assert engine_kwargs(composite_dir, EngineSettings())["dtype"] == "auto"


def test_data_parallelism_reaches_vllm_for_a_composite(composite_dir):
    """Replicas of a composite serve it (tests/server/test_data_parallel.py); one is the default."""
    assert engine_kwargs(composite_dir, EngineSettings())["data_parallel_size"] == 1
    assert engine_kwargs(composite_dir, EngineSettings(data_parallel_size=2))["data_parallel_size"] == 2
    # The server admits as many running requests as every replica decodes (server/limits.py).
    assert EngineSettings(max_num_seqs=16, data_parallel_size=2).running_capacity() == 32


def test_prefix_caching_is_on_for_every_composite_unless_turned_off(composite_dir):
    """Whatever the gate: the engine arguments no longer read it (test_prefix_caching.py runs a posterior)."""
    assert engine_kwargs(composite_dir, EngineSettings())["enable_prefix_caching"] is True
    assert engine_kwargs(composite_dir, EngineSettings(enable_prefix_caching=False))["enable_prefix_caching"] is False
