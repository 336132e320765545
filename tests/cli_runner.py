"""The ``gatemix`` command run in this process, as a subprocess would see it: exit code, stdout, stderr.

A subprocess pays a fresh interpreter and the torch and vLLM imports (about ten
seconds on a 2-core machine) for every call; in process they are paid once per
worker. The code path is the console script's own (``gatemix.cli.main``), and an
uncaught exception still fails the test, as a traceback would.
"""

from __future__ import annotations

import io
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass

from gatemix.cli import main


@dataclass(frozen=True)
class CliResult:
    returncode: int
    stdout: str
    stderr: str


def run_gatemix(*args: str) -> CliResult:
    """``gatemix ARGS...`` in this process."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with redirect_stdout(stdout), redirect_stderr(stderr):
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse's usage errors
            code = exc.code if isinstance(exc.code, int) else 1
    return CliResult(code, stdout.getvalue(), stderr.getvalue())
