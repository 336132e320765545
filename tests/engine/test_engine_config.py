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
