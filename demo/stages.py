"""Build stages on disk: stamps, reuse, and atomic replacement.

A stage's output is a folder. It is built in a temp folder next to its target,
stamped last (``stage.json``: the stage's key, a fresh build id and what the
build reported), and renamed into place. So a folder at the target path with a
stamp is always complete, and an interrupted build leaves at most a temp folder
that the next build clears.

A stage's key hashes the config fields it depends on and the build ids of the
stages it reads, so rebuilding an upstream stage always rebuilds what was built
from it, even when the config did not change.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from gatemix.atomic_write import atomic_folder, write_atomically
from gatemix.demo.errors import DemoBuildError

logger = logging.getLogger(__name__)

STAMP_FILE = "stage.json"


def stage_key(*parts: Any) -> str:
    """A stable hash of JSON-able parts (config fields, upstream build ids)."""
    encoded = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(encoded.encode()).hexdigest()


def read_stamp(folder: Path) -> dict | None:
    """The stage stamp in ``folder``; None when the stage was never completed there."""
    if folder.exists() and not folder.is_dir():
        raise DemoBuildError(f"stage path {folder} is a file, not a folder")
    path = folder / STAMP_FILE
    if not path.is_file():
        return None
    try:
        stamp = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DemoBuildError(f"corrupt stage stamp {path} ({error}); delete {folder} "
                             "to rebuild it") from None
    if not isinstance(stamp, dict) or not {"key", "build_id", "info"} <= stamp.keys():
        raise DemoBuildError(f"corrupt stage stamp {path}; delete {folder} to rebuild it")
    return stamp


def find_done(folder: Path, key: str, required_files: Sequence[str]) -> dict | None:
    """The stamp of a completed stage with this key, or None if it must be (re)built.

    A stage stamped with this key but missing one of its files was changed after
    it was built: that is refused, not silently rebuilt.
    """
    stamp = read_stamp(folder)
    if stamp is None or stamp["key"] != key:
        return None
    missing = [name for name in required_files if not (folder / name).is_file()]
    if missing:
        raise DemoBuildError(f"stage {folder} is corrupt: missing {', '.join(missing)}; "
                             "delete it to rebuild it")
    return stamp


def run_stage(name: str, folder: Path, key: str, required_files: Sequence[str],
              build: Callable[[Path], dict]) -> dict:
    """Reuse the stage in ``folder`` if its key matches, else build it atomically.

    ``build(temp_folder)`` writes the outputs and returns a JSON-able info dict,
    kept in the stamp. Returns the stamp.
    """
    stamp = find_done(folder, key, required_files)
    if stamp is not None:
        logger.info("reusing %s (%s)", name, folder)
        return stamp
    logger.info("building %s -> %s", name, folder)
    clear_leftovers(folder)
    with atomic_folder(folder) as temp:
        started = time.monotonic()
        info = build(temp)
        stamp = {"stage": name, "key": key, "build_id": uuid.uuid4().hex, "info": info,
                 "build_seconds": round(time.monotonic() - started, 2)}
        write_json(temp / STAMP_FILE, stamp)
    return stamp


def clear_leftovers(folder: Path) -> None:
    """Remove staging copies of ``folder`` that an interrupted (killed) build left.

    ``atomic_folder`` stages beside the target as ``.<name>.<random>``.
    """
    if not folder.parent.is_dir():
        return
    for leftover in folder.parent.glob(f".{folder.name}.*"):
        shutil.rmtree(leftover, ignore_errors=True)


def write_json(path: Path, payload: Any) -> None:
    path.write_text(json_text(payload), encoding="utf-8")


def json_text(payload: Any) -> str:
    return json.dumps(payload, indent=2, sort_keys=False) + "\n"


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write a JSON file through a temp file and a rename, so readers see old or new."""
    write_atomically(path, json_text(payload))
