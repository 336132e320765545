"""Settings and the ``gatemix serve`` flags (no server needed)."""

from __future__ import annotations

import argparse

import pytest

from gatemix.engine.engine_config import EngineSettings
from gatemix.server.cli import add_serve_parser, settings_from_args
from gatemix.server.settings import Settings


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers())
    return parser.parse_args(["serve", *argv])


def test_every_setting_has_a_documented_flag():
    parser = argparse.ArgumentParser()
    serve = add_serve_parser(parser.add_subparsers())
    help_text = " ".join(serve.format_help().split())
    for name in Settings.model_fields:
        if name != "engine":
            assert f"GATEMIX_{name.upper()}" in help_text
    for name in EngineSettings.model_fields:
        assert f"GATEMIX_ENGINE__{name.upper()}" in help_text and f"--{name.replace('_', '-')}" in help_text


def test_env_keys_are_a_comma_list_and_flags_win_over_env(monkeypatch):
    monkeypatch.setenv("GATEMIX_API_KEYS", "alpha, beta,,")
    monkeypatch.setenv("GATEMIX_MAX_N", "3")
    assert settings_from_args(parse([])).api_keys == ["alpha", "beta"]
    settings = settings_from_args(
        parse(["--api-key", "gamma", "--max-n", "7", "--no-enforce-eager"])
    )
    assert (
        settings.api_keys == ["gamma"] and settings.max_n == 7 and settings.engine.enforce_eager is False
    )


def test_engine_flags_merge_with_engine_variables_field_by_field(monkeypatch):
    monkeypatch.setenv("GATEMIX_ENGINE__KV_CACHE_GIB", "5")
    monkeypatch.setenv("GATEMIX_ENGINE__MAX_MODEL_LEN", "128")
    engine = settings_from_args(parse(["--max-model-len", "256"])).engine
    assert (engine.kv_cache_gib, engine.max_model_len) == (5, 256)


def test_engine_defaults_follow_the_device():
    """No context length and no eager setting unless asked: vLLM's and the device's own."""
    from gatemix.engine.engine_config import on_cpu

    engine = Settings().engine
    assert engine.max_model_len is None and engine.enforce_eager is None
    assert engine.resolved_enforce_eager() is on_cpu()
    assert engine.gpu_memory_utilization == EngineSettings().gpu_memory_utilization


def test_bad_setting_is_a_one_line_user_error():
    from gatemix.errors import UserError

    with pytest.raises(UserError, match="max_model_len"):
        settings_from_args(parse(["--max-model-len", "4"]))


def test_engine_settings_carry_the_sizes():
    engine = settings_from_args(
        parse(["--max-model-len", "256", "--max-num-seqs", "8", "--kv-cache-gib", "3", "--dtype", "float32"])
    ).engine
    assert (engine.max_model_len, engine.max_num_seqs, engine.kv_cache_gib, engine.dtype) == (
        256, 8, 3, "float32"
    )


def test_a_folder_without_config_is_refused_before_the_engine_starts(tmp_path):
    from gatemix.server.app import resolve_settings

    with pytest.raises(FileNotFoundError, match="not a model folder"):
        resolve_settings(Settings(model_dir=tmp_path))
    (tmp_path / "config.json").write_text("{}")
    assert resolve_settings(Settings(model_dir=tmp_path)).model_dir == tmp_path


@pytest.mark.parametrize("argv, env, expected", [
    ([], {}, ("/p/student", 5)),  # the project's [serve] draft and its N
    (["--num-draft-tokens", "2"], {}, ("/p/student", 2)),  # a flag wins over the project's N
    ([], {"GATEMIX_ENGINE__NUM_DRAFT_TOKENS": "4"}, ("/p/student", 4)),  # and so does a variable
])
def test_a_project_draft_applies_where_no_flag_names_one(argv, env, expected, monkeypatch):
    from types import SimpleNamespace

    from gatemix.server.app import _with_project_draft

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    project = SimpleNamespace(path="/p/gatemix.toml", draft="/p/student", num_draft_tokens=5)
    engine = _with_project_draft(settings_from_args(parse(argv)).engine, project)
    assert (engine.draft, engine.num_draft_tokens) == expected


def test_a_composite_on_gpu_gets_piecewise_cuda_graphs_and_vllm_s_async_scheduling(composite_dir, monkeypatch):
    """Full-model CUDA graphs would freeze the per-request pins read in forward(); the experts'
    compiled graph is captured piecewise instead. A plain folder keeps vLLM's own choice, and
    both keep vLLM's choice of async scheduling unless it is asked for."""
    from gatemix.engine import engine_config

    monkeypatch.setattr(engine_config, "on_cpu", lambda: False)
    composite = engine_config.engine_kwargs(composite_dir, EngineSettings())
    assert composite["enforce_eager"] is False and "async_scheduling" not in composite
    assert composite["compilation_config"] == {"cudagraph_mode": "PIECEWISE"}
    eager = engine_config.engine_kwargs(composite_dir, EngineSettings(enforce_eager=True))
    assert "compilation_config" not in eager
    plain = engine_config.engine_kwargs(composite_dir / "expert_configs" / "a", EngineSettings())
    assert "compilation_config" not in plain and "async_scheduling" not in plain
    asked = engine_config.engine_kwargs(composite_dir, EngineSettings(async_scheduling=False))
    assert asked["async_scheduling"] is False
