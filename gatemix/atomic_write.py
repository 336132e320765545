"""Writing files and folders so that a reader never sees half of one.

Every job's output (a composite, a student, a project file, a split record,
random bench experts) is written beside its target and renamed into place,
so an interrupted job leaves the old output or none, never a broken one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path``; when the block ends without error it replaces ``path``.

    For writers that want a path rather than text (``torch.save``, ``json.dump`` to a
    handle, safetensors): they write the yielded path, and readers see the old file or
    the whole new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        yield Path(temp_name)
        os.chmod(temp_name, 0o644)
        os.replace(temp_name, path)
    finally:
        Path(temp_name).unlink(missing_ok=True)


def write_atomically(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` through a temporary file and a rename."""
    with atomic_file(path) as temp:
        temp.write_text(text, encoding="utf-8")


@contextlib.contextmanager
def atomic_folder(out: str | os.PathLike) -> Iterator[Path]:
    """A staging folder beside ``out``; when the block ends without error it replaces ``out``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        os.chmod(staging, 0o755)  # mkdtemp's 0700 would hide the folder from a server's user
        yield staging
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
