"""Session-scoped, disk-cached fixtures: the tiny demo build and its composite; the suite's schedule.

The demo build is cached under ``.cache/`` in the repository (ignored by git),
so the first ``make test`` on a machine pays ~2 minutes for it and later runs
reuse it; the build itself decides what is stale. Under pytest-xdist each
worker has its own session, so the build is taken under a file lock: the first
worker builds, the others wait and reuse it.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

import pytest
from filelock import FileLock
from scheduling import (
    GROUPS_FILE_KEY,
    GroupScheduling,
    controller_groups_file,
    record_seconds,
    schedule,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
CACHE_DIR = Path(os.environ.get("GATEMIX_TEST_CACHE", REPO_ROOT / ".cache"))

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
# The expert-hash memo stays in the test cache, not the user's home.
os.environ.setdefault("GATEMIX_CACHE_DIR", str(CACHE_DIR / "gatemix-home"))
# On a busy 2-core machine spinning OpenMP threads make training steps many times slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_addoption(parser):
    parser.addoption("--record-durations", action="store_true",
                     help="write each test file's seconds to tests/durations.json (the xdist order)")


def pytest_collection_modifyitems(config, items):
    schedule(config, items)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    node.workerinput[GROUPS_FILE_KEY] = str(controller_groups_file())


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadgroup`` runs our groups (tests/scheduling.py), longest first."""
    if config.getvalue("dist") != "loadgroup":
        return None
    config.option.loadscopereorder = False
    return GroupScheduling(config, log)


_file_seconds: dict[str, float] = defaultdict(float)


def pytest_runtest_logreport(report):
    # Under xdist the controller sees every worker's reports; it alone writes the file.
    _file_seconds[report.nodeid.split("::")[0]] += report.duration


def pytest_sessionfinish(session):
    config = session.config
    if hasattr(config, "workerinput"):
        return
    controller_groups_file().unlink(missing_ok=True)
    if config.getoption("--record-durations"):
        record_seconds(dict(_file_seconds))


def worker_cache(name: str) -> Path:
    """A cache path of this xdist worker's own (``name-gw0``), for outputs a worker rewrites."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    return CACHE_DIR / (f"{name}-{worker}" if worker else name)


@pytest.fixture(scope="session")
def demo_paths():
    from gatemix.demo.build import build_demo
    from gatemix.demo.config import DemoConfig

    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with FileLock(str(CACHE_DIR / "demo-test.lock")):
        return build_demo(DemoConfig.preset("test", out_dir=CACHE_DIR / "demo-test"))


@pytest.fixture(scope="session")
def demo_project(demo_paths):
    """The demo's project file, loaded: what every job reads."""
    from gatemix.project import load_project

    return load_project(demo_paths.project_file)


@pytest.fixture(scope="session")
def composite_dir(demo_paths) -> Path:
    """The demo experts packed with a uniform gate."""
    from gatemix.engine.pack import pack_composite

    out = worker_cache("composite-uniform")
    pack_composite(list(demo_paths.expert_dirs.values()), out, gate="uniform", overwrite=True)
    return out
