"""``gatemix distill-gate``: the subcommand module (its parser lives with ``fit-gate``'s)."""

from gatemix.gate.cli import add_distill_parser as add_parser

__all__ = ["add_parser"]
