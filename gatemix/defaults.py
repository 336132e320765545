"""Defaults shared by every command, so that one name means one place."""

from __future__ import annotations

# Where `gatemix build-demo` writes the demo (its gatemix.toml included), and so the
# project every job and `gatemix serve` read when none is named.
DEFAULT_PROJECT_DIR = "artifacts/demo"
