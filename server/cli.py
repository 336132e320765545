"""``gatemix serve``: the OpenAI-compatible server, one flag per ``Settings`` field.

The flags are generated from ``Settings`` by ``gatemix.config_cli`` (the one
flags generator of every command) so that ``--help`` documents every setting
with its environment variable; a flag given wins over the environment.
"""

from __future__ import annotations

import argparse

from pydantic import ValidationError

from gatemix.config_cli import add_config_flags, given_values
from gatemix.engine.engine_config import EngineSettings
from gatemix.errors import UserError
from gatemix.server.settings import ENV_NESTED_DELIMITER, ENV_PREFIX, Settings

NESTED_ENGINE = "engine"  # the Settings field holding EngineSettings

# Fields whose flag is not simply --field-name.
_FLAG_NAMES = {"api_keys": "--api-key", "admin_keys": "--admin-key"}


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "serve",
        help="serve the ensemble (and each expert) through an OpenAI-compatible API",
        description="Serve a gatemix composite folder (or a plain model folder) with vLLM behind "
        "an OpenAI-compatible API: /v1/completions, /v1/chat/completions, /v1/models, vLLM's "
        "/tokenize, /detokenize, /tokenizer_info, /version and /ping, /health, /metrics. SIGTERM "
        "drains in-flight requests; a dead engine ends the process (exit status 4). Every flag "
        "can also be set with the environment variable shown.",
    )
    add_config_flags(parser, Settings, skip=(NESTED_ENGINE,), env_prefix=ENV_PREFIX,
                     flag_names=_FLAG_NAMES)
    add_config_flags(parser, EngineSettings, dest_prefix=f"{NESTED_ENGINE}.",
                     env_prefix=f"{ENV_PREFIX}{NESTED_ENGINE.upper()}{ENV_NESTED_DELIMITER}")
    parser.set_defaults(run=run_serve)
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Flags given on the command line over ``GATEMIX_*`` variables over defaults."""
    given = given_values(args, Settings, lists_as_tuples=False)
    engine = given_values(args, EngineSettings, dest_prefix=f"{NESTED_ENGINE}.", lists_as_tuples=False)
    if engine:  # pydantic-settings merges these over GATEMIX_ENGINE__* variables, field by field
        given[NESTED_ENGINE] = engine
    try:
        return Settings(**given)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "settings"
        raise UserError(f"{where}: {first['msg']}") from None


def run_serve(args: argparse.Namespace) -> int:
    # The app and the engine import vLLM: deferred so that `gatemix serve --help` stays fast.
    from gatemix.engine.engine_config import check_engine_settings
    from gatemix.server.app import create_app, resolve_settings
    from gatemix.server.lifecycle import serve

    # Resolved here too, so that a bad folder is a one-line error, not a failed startup.
    settings = resolve_settings(settings_from_args(args))
    check_engine_settings(settings.model_dir, settings.engine)
    return serve(create_app(settings), settings)


# The names gatemix/cli.py dispatches to.
add_parser = add_serve_parser
run = run_serve
