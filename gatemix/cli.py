"""The ``gatemix`` command: one subcommand per stage of the pipeline.

    build-demo -> fit-gate -> pack -> serve -> bench, and distill

Each subcommand's module owns its arguments; this file only dispatches and
turns the pipeline's own errors into one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from gatemix.errors import UserError

# Training jobs: idle OpenMP threads must sleep, not spin, or a busy 2-core machine
# runs each step many times slower. Set before torch is imported.
TRAINING_COMMANDS = ("build-demo", "fit-gate", "distill-gate", "distill", "distill-report")

# subcommand -> module exposing add_parser(subparsers) and run(args) -> int | None
SUBCOMMANDS = {
    "build-demo": "gatemix.demo.cli",
    "pack": "gatemix.engine.pack_cli",
    "serve": "gatemix.server.cli",
    "fit-gate": "gatemix.gate.fit.cli",
    "distill-gate": "gatemix.gate.fit.alias_cli",  # deprecated: fit-gate --stage router
    "distill": "gatemix.distill.cli",
    "distill-report": "gatemix.distill.report_cli",
    "bench": "gatemix.bench.cli",
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gatemix", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # Import only the chosen subcommand's module (vLLM imports are slow), but list all in --help.
    chosen = next((arg for arg in argv if arg in SUBCOMMANDS), None)
    for name, module in SUBCOMMANDS.items():
        if name == chosen:
            importlib.import_module(module).add_parser(subparsers)
        else:
            subparsers.add_parser(name, help=f"see `gatemix {name} --help`", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(arg in TRAINING_COMMANDS for arg in argv):
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = build_parser(argv).parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.run(args) or 0)
    except (UserError, FileNotFoundError) as exc:
        print(f"gatemix {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
