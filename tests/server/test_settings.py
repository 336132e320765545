"""Settings and the ``gatemix serve`` flags (no server needed)."""

from __future__ import annotations

import argparse

import pytest
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
        assert f"GATEMIX_{name.upper()}" in help_text


def test_env_keys_are_a_comma_list_and_flags_win_over_env(monkeypatch):
    monkeypatch.setenv("GATEMIX_API_KEYS", "alpha, beta,,")
    monkeypatch.setenv("GATEMIX_MAX_N", "3")
    assert settings_from_args(parse([])).api_keys == ["alpha", "beta"]
    settings = settings_from_args(
        parse(["--api-key", "gamma", "--max-n", "7", "--no-enforce-eager"])
    )
    assert (
        settings.api_keys == ["gamma"] and settings.max_n == 7 and settings.enforce_eager is False
    )


def test_bad_setting_is_a_one_line_user_error():
    from gatemix.errors import UserError

    with pytest.raises(UserError, match="max_model_len"):
        settings_from_args(parse(["--max-model-len", "4"]))


def test_engine_settings_carry_the_sizes():
    engine = Settings(
        max_model_len=256, max_num_seqs=8, kv_cache_gib=3, dtype="float32"
    ).engine_settings("/m")
    assert (engine.model_dir, engine.max_model_len, engine.max_num_seqs, engine.kv_cache_gib) == (
        "/m",
        256,
        8,
        3,
    )
    assert engine.dtype == "float32"


def test_a_folder_without_config_is_refused_before_the_engine_starts(tmp_path):
    from gatemix.server.app import resolve_settings

    with pytest.raises(FileNotFoundError, match="not a model folder"):
        resolve_settings(Settings(model_dir=tmp_path))
    (tmp_path / "config.json").write_text("{}")
    assert resolve_settings(Settings(model_dir=tmp_path)).model_dir == tmp_path
