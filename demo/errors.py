"""The one error type of the demo build boundary."""

from __future__ import annotations

from gatemix.errors import UserError


class DemoBuildError(UserError):
    """Bad input to the demo build: a bad config, an unusable out dir, no text found,
    or a corrupt stage on disk. The message is one line, fit for a CLI to print."""
