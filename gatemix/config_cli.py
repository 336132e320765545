"""One way to turn a job's config dataclass into command-line flags, and back.

Every offline job (``fit-gate``, ``distill``, ``bench``) has one dataclass config
with ``metadata={"help": ...}`` on every field and range checks in
``__post_init__``. ``add_dataclass_flags`` makes one ``--field-name`` flag per
field, with the field's own help and default, so the dataclass stays the one
source of truth; ``config_from_args`` builds the config back and turns its
range checks into a ``UserError`` (one line, exit 2).

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

    ``field(default=3, **field_help("steps"))``; extra ``metadata`` (``choices``, a
    ``flag`` name) rides along for ``add_dataclass_flags``.
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


def add_dataclass_flags(
    parser: argparse.ArgumentParser,
    config_cls: type,
    *,
    skip: Iterable[str] = (),
    defaults: dict | None = None,
) -> None:
    """One flag per field of ``config_cls`` except ``skip``; ``defaults`` shown instead of the field's."""
    hints = typing.get_type_hints(config_cls)
    skipped, shown = set(skip), defaults or {}
    for field in dataclasses.fields(config_cls):
        if field.name in skipped or not field.init:
            continue
        if field.name in shown:
            default = shown[field.name]
        elif field.default is not dataclasses.MISSING:
            default = field.default
        elif field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        else:
            default = dataclasses.MISSING
        required = default is dataclasses.MISSING and field.name not in shown
        help_text = field.metadata.get("help", "")
        kind, nargs = _flag_type(hints[field.name])
        flag = field_flag(field.name)
        if kind is bool:
            parser.add_argument(
                flag, dest=field.name, action=argparse.BooleanOptionalAction, default=None,
                help=f"{help_text} (default: {default})",
            )
            continue
        parser.add_argument(
            flag,
            dest=field.name,
            type=kind,
            nargs=nargs,
            default=None,
            required=required,
            choices=field.metadata.get("choices"),
            metavar=field.name.upper(),
            help=help_text if required else f"{help_text} (default: {default})",
        )


def given_values(args: argparse.Namespace, config_cls: type) -> dict:
    """The fields of ``config_cls`` that were given on the command line (lists as tuples)."""
    values = {}
    for field in dataclasses.fields(config_cls):
        value = getattr(args, field.name, None)
        if value is not None:
            values[field.name] = tuple(value) if isinstance(value, list) else value
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
