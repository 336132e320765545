"""Session-scoped, disk-cached fixtures: the tiny demo build and its composite.

The demo build is cached under ``.cache/`` in the repository (ignored by git),
so the first ``make test`` on a machine pays ~2 minutes for it and later runs
reuse it; the build itself decides what is stale.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
CACHE_DIR = Path(os.environ.get("GATEMIX_TEST_CACHE", REPO_ROOT / ".cache"))

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
# The expert-hash memo stays in the test cache, not the user's home.
os.environ.setdefault("GATEMIX_CACHE_DIR", str(CACHE_DIR / "gatemix-home"))
# On a busy 2-core machine spinning OpenMP threads make training steps many times slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def demo_paths():
    from gatemix.demo.build import build_demo
    from gatemix.demo.config import DemoConfig

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

    out = CACHE_DIR / "composite-uniform"
    pack_composite(list(demo_paths.expert_dirs.values()), out, gate="uniform", overwrite=True)
    return out
