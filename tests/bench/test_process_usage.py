"""ProcessUsage splits a process tree's CPU time into the root (API) and its descendants (engine)."""

import subprocess
import sys
import time

import pytest

from gatemix.bench.servers import ProcessUsage

# Waits 0.5 s (so the first sample is taken before), then burns `seconds` of CPU.
BURN = "import time\ntime.sleep(0.5)\nend = time.process_time() + {seconds}\nwhile time.process_time() < end: pass\n"
# A root process that starts a child running `child_code`, runs `root_code` itself, then waits.
TREE = (
    "import subprocess, sys, time\n"
    "child = subprocess.Popen([sys.executable, '-c', {child_code!r}])\n"
    "{root_code}\n"
    "child.wait()\n"
)


def _run_tree(child_code: str, root_code: str) -> ProcessUsage:
    root = subprocess.Popen([sys.executable, "-c", TREE.format(child_code=child_code, root_code=root_code)])
    time.sleep(0.3)  # the child exists before the first sample, so it has a baseline
    try:
        with ProcessUsage([root.pid], interval_s=0.05) as usage:
            root.wait(timeout=60)
    finally:
        root.kill()
    return usage


def test_a_busy_child_counts_as_engine_time_not_api_time():
    usage = _run_tree(BURN.format(seconds=1.0), "time.sleep(0.01)")
    assert usage.engine_cpu_s == pytest.approx(1.0, abs=0.15)
    assert usage.api_cpu_s < 0.2
    assert usage.peak_mib > 5  # two Python interpreters


def test_a_busy_root_counts_as_api_time_not_engine_time():
    usage = _run_tree("import time; time.sleep(1.8)", BURN.format(seconds=1.0))
    assert usage.api_cpu_s == pytest.approx(1.0, abs=0.15)
    assert usage.engine_cpu_s < 0.2
