"""The one error type of gatemix's offline boundary: bad input to a job.

Every job (``build-demo``, ``fit-gate``, ``pack``, ``distill``, ``serve``'s start-up,
``bench``) raises a ``UserError`` subclass for input it refuses: a missing
folder, a file without the text field, experts that cannot share a mixture.
The message is one line that names the file and the problem; the ``gatemix``
command prints it and exits 2. Everything else is a bug and keeps its traceback.

The HTTP boundary has its own type (``server.errors.APIError``), mapped to
OpenAI error bodies in one place.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input to a gatemix job; the message is one line, fit for a CLI to print."""
