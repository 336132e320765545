"""``gatemix serve``: the OpenAI-compatible server, one flag per ``Settings`` field.

The flags are generated from ``Settings`` so that ``--help`` documents every
setting with its environment variable; a flag given wins over the environment.
"""

from __future__ import annotations

import argparse
import typing

from gatemix.engine.engine_config import EngineSettings
from gatemix.server.settings import ENV_NESTED_DELIMITER, ENV_PREFIX, Settings

NESTED_ENGINE = "engine"  # the Settings field holding EngineSettings

# Fields whose flag is not simply --field-name.
_FLAG_NAMES = {"api_keys": "--api-key", "admin_keys": "--admin-key"}


def _flag_type(annotation) -> str:
    args = typing.get_args(annotation)
    if annotation is bool or bool in args:
        return "bool"
    if typing.get_origin(annotation) is list or any(typing.get_origin(a) is list for a in args):
        return "list"
    return "value"


def _add_setting_flag(parser: argparse.ArgumentParser, name: str, dest: str, field, env: str) -> None:
    flag = _FLAG_NAMES.get(name, "--" + name.replace("_", "-"))
    default = field.get_default(call_default_factory=True)
    help_text = f"{field.description} [env {env}; default {default}]"
    kind = _flag_type(field.annotation)
    if kind == "bool":
        parser.add_argument(
            flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=help_text
        )
    elif kind == "list":
        parser.add_argument(
            flag,
            dest=dest,
            action="append",
            default=None,
            metavar="KEY",
            help=help_text + " (repeat the flag for several)",
        )
    else:
        parser.add_argument(flag, dest=dest, default=None, metavar=name.upper(), help=help_text)


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
    for name, field in Settings.model_fields.items():
        if name == NESTED_ENGINE:
            continue
        _add_setting_flag(parser, name, name, field, ENV_PREFIX + name.upper())
    for name, field in EngineSettings.model_fields.items():
        env = f"{ENV_PREFIX}{NESTED_ENGINE.upper()}{ENV_NESTED_DELIMITER}{name.upper()}"
        _add_setting_flag(parser, name, f"{NESTED_ENGINE}.{name}", field, env)
    parser.set_defaults(run=run_serve)
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Flags given on the command line over ``GATEMIX_*`` variables over defaults."""
    from pydantic import ValidationError

    given = {
        name: getattr(args, name)
        for name in Settings.model_fields
        if getattr(args, name, None) is not None
    }
    engine = {
        name: getattr(args, f"{NESTED_ENGINE}.{name}")
        for name in EngineSettings.model_fields
        if getattr(args, f"{NESTED_ENGINE}.{name}", None) is not None
    }
    if engine:  # pydantic-settings merges these over GATEMIX_ENGINE__* variables, field by field
        given[NESTED_ENGINE] = engine
    try:
        return Settings(**given)
    except ValidationError as exc:
        from gatemix.errors import UserError

        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "settings"
        raise UserError(f"{where}: {first['msg']}") from None


def run_serve(args: argparse.Namespace) -> int:
    from gatemix.server.app import create_app, resolve_settings
    from gatemix.server.lifecycle import serve

    # Resolved here too, so that a bad folder is a one-line error, not a failed startup.
    settings = resolve_settings(settings_from_args(args))
    return serve(create_app(settings), settings)


# The names gatemix/cli.py dispatches to.
add_parser = add_serve_parser
run = run_serve
