"""One way to turn a command's config class into command-line flags, and back.

Every offline job (``fit-gate``, ``distill``, ``bench``, ``pack``) has one dataclass
config with ``metadata={"help": ...}`` on every field and range checks in
``__post_init__``; the server has one pydantic ``Settings`` (``description`` on
every field, values also read from ``GATEMIX_*`` variables). ``add_config_flags``
makes one ``--field-name`` flag per field of either kind, with the field's own
help and default, so the config class stays the one source of truth;
``config_from_args`` builds a dataclass config back and turns its range checks
into a ``UserError`` (one line, exit 2).

A pydantic settings class validates its own values (and reads lists from the
environment as comma-separated text), so its flags take text and a list is
given by repeating the flag; the help names each field's environment variable.

Flags left unset keep the dataclass default: every flag's parser default is
``None`` and only the flags given are passed on, so a project file or a caller
can fill in what the user did not say.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Iterable

from gatemix.errors import UserError


def field_help(text: str, **metadata) -> dict:
    """``dataclasses.field`` keywords that give a config field its flag help.

    ``field(default=3, **field_help("steps"))``; extra ``metadata`` rides along for
    ``add_config_flags``: ``choices``; ``flag`` (another flag name, or a positional
    name without dashes); ``nargs``; ``switch=True`` (a bool given as a bare flag, no
    ``--no-`` form); ``show_default=False`` (the help text says the default itself).
    """
    return {"metadata": {"help": text, **metadata}}


def _unwrap_optional(annotation):
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation


def _flag_type(annotation) -> tuple[type, str | None]:
    """argparse ``type`` and ``nargs`` for a field annotation (``X | None``, tuples, lists)."""
    annotation = _unwrap_optional(annotation)
    origin = typing.get_origin(annotation)
    if origin in (tuple, list):
        return typing.get_args(annotation)[0], "+"
    return annotation, None


def field_flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclasses.dataclass(frozen=True)
class ConfigField:
    """One field of a config class, as its flag needs it (dataclass or pydantic alike)."""

    name: str
    annotation: object
    default: object  # dataclasses.MISSING when the field is required
    help: str
    metadata: typing.Mapping


def _is_pydantic_model(config_cls: type) -> bool:
    return hasattr(config_cls, "model_fields")


def config_fields(config_cls: type) -> list[ConfigField]:
    """The init fields of a dataclass or a pydantic model, in declaration order."""
    if _is_pydantic_model(config_cls):
        return [
            ConfigField(
                name, field.annotation,
                dataclasses.MISSING if field.is_required() else field.get_default(call_default_factory=True),
                field.description or "",
                field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {},
            )
            for name, field in config_cls.model_fields.items()
        ]
    hints = typing.get_type_hints(config_cls)
    fields = []
    for field in dataclasses.fields(config_cls):
        if not field.init:
            continue
        default = field.default
        if field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        fields.append(ConfigField(field.name, hints[field.name], default,
                                  field.metadata.get("help", ""), field.metadata))
    return fields


def add_config_flags(
    parser: argparse.ArgumentParser,
    config_cls: type,
    *,
    skip: Iterable[str] = (),
    defaults: dict | None = None,
    dest_prefix: str = "",
    env_prefix: str | None = None,
    flag_names: dict[str, str] | None = None,
) -> None:
    """One flag per field of ``config_cls`` (a dataclass or a pydantic model) except ``skip``.

    ``defaults`` are shown instead of the fields' own; ``dest_prefix`` namespaces
    the parsed values (a nested settings object); ``env_prefix`` names each
    field's environment variable in the help (``GATEMIX_`` + ``NAME``);
    ``flag_names`` maps a field to a flag other than ``--field-name``.
    """
    skipped, shown, renamed = set(skip), defaults or {}, flag_names or {}
    for field in config_fields(config_cls):
        if field.name in skipped:
            continue
        default = shown.get(field.name, field.default)
        flag = renamed.get(field.name) or field.metadata.get("flag") or field_flag(field.name)
        dest = dest_prefix + field.name
        if env_prefix is not None:
            _add_setting_flag(parser, field, flag, dest, default, env_prefix + field.name.upper())
        else:
            _add_dataclass_flag(parser, field, flag, dest, default)


def _add_setting_flag(parser, field: ConfigField, flag: str, dest: str, default, env: str) -> None:
    """A pydantic setting's flag: text (the model validates it), lists by repeating the flag."""
    help_text = f"{field.help} [env {env}; default {default}]"
    args = typing.get_args(field.annotation)
    if field.annotation is bool or bool in args:
        parser.add_argument(
            flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=help_text
        )
    elif typing.get_origin(field.annotation) is list or any(typing.get_origin(a) is list for a in args):
        parser.add_argument(
            flag, dest=dest, action="append", default=None, metavar="KEY",
            help=help_text + " (repeat the flag for several)",
        )
    else:
        parser.add_argument(flag, dest=dest, default=None, metavar=field.name.upper(), help=help_text)


def _add_dataclass_flag(parser, field: ConfigField, flag: str, dest: str, default) -> None:
    """A dataclass field's flag: typed by its annotation, lists as several values."""
    required = default is dataclasses.MISSING
    help_text = field.help
    if not required and field.metadata.get("show_default", True):
        help_text = f"{help_text} (default: {default})"
    kind, nargs = _flag_type(field.annotation)
    if kind is bool:
        action = "store_true" if field.metadata.get("switch") else argparse.BooleanOptionalAction
        parser.add_argument(flag, dest=dest, action=action, default=None, help=help_text)
        return
    nargs = field.metadata.get("nargs", nargs)
    if not flag.startswith("-"):  # a positional argument: its name is its dest
        parser.add_argument(flag, type=kind, nargs=nargs, default=None, help=help_text)
        return
    parser.add_argument(
        flag, dest=dest, type=kind, nargs=nargs, default=None, required=required,
        choices=field.metadata.get("choices"), metavar=field.name.upper(), help=help_text,
    )


def given_values(args: argparse.Namespace, config_cls: type, *, dest_prefix: str = "",
                 lists_as_tuples: bool = True) -> dict:
    """The fields of ``config_cls`` that were given on the command line (lists as tuples)."""
    values = {}
    for field in config_fields(config_cls):
        value = getattr(args, dest_prefix + field.name, None)
        if value is not None:
            values[field.name] = tuple(value) if lists_as_tuples and isinstance(value, list) else value
    return values


def build_config(config_cls: type, values: dict):
    """``config_cls(**values)``, with its range checks as one-line ``UserError``s."""
    hints = typing.get_type_hints(config_cls)
    for name, value in list(values.items()):
        if isinstance(value, tuple) and typing.get_origin(_unwrap_optional(hints.get(name))) is list:
            values[name] = list(value)
    try:
        return config_cls(**values)
    except (ValueError, TypeError) as exc:
        if isinstance(exc, UserError):
            raise
        raise UserError(str(exc)) from exc


def config_from_args(args: argparse.Namespace, config_cls: type, **fixed):
    """The config from the given flags over ``fixed`` values over the dataclass defaults."""
    return build_config(config_cls, {**fixed, **given_values(args, config_cls)})
