"""``gatemix distill-gate``: the deprecated name of ``gatemix fit-gate --stage router``.

A subcommand module of its own, because ``gatemix.cli`` maps each name to a
module exposing ``add_parser``; the parser and the run live in ``cli.py``.
"""

from gatemix.gate.fit.cli import add_alias_parser as add_parser

__all__ = ["add_parser"]
