"""How the suite is split across pytest-xdist workers (``make test`` runs ``-n 3``).

A session server or a module's engine is costly to start, so every test that
shares one runs in the same worker: the tests of one file form one group, and
every file that uses a session server joins that server's group (one group for
servers some file uses together).
Groups run longest first (the sum of their files' last measured seconds,
``durations.json``, rewritten by ``pytest --record-durations``), so the short
ones fill in at the end instead of one long group starting last. One exception:
on a fresh clone the first test that needs the demo builds it (about two
minutes) while every other that needs it waits on the build's lock, so of the
groups the workers start with, only one needs the demo; the others start with
the longest groups that do not, and use the cores the build leaves idle.

Tests that build or serve real models are marked ``slow``; ``make test-fast``
runs the rest.

The groups reach xdist through a scheduler of our own (``GroupScheduling``):
xdist's ``loadgroup`` reads ``xdist_group`` marks by rewriting node ids, which
pytest 9.2 no longer lets a plugin do. Every worker writes the file -> group map
it computed at collection to a path the controller gave it; the controller's
scheduler reads it once all workers have collected.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
from xdist.scheduler import LoadScopeScheduling

from gatemix.atomic_write import write_atomically

DURATIONS_FILE = Path(__file__).with_name("durations.json")

# Session fixtures that start a server: every file using one joins that server's group.
SHARED_SERVERS = ("routed_server", "server")

# Fixtures that build, train, pack or serve real models: a test using one is `slow`.
HEAVY_FIXTURES = frozenset({
    "demo_paths", "demo_project", "composite_dir", "served_project", "server_model_dir",
    "server", "routed_server", "micro_demo", "tiny_project", "tiny_student",
    "lambda_composite",
})

# The session fixture every test that needs the demo depends on: built once, under a lock.
SHARED_BUILD_FIXTURE = "demo_paths"

# A file never measured (a new one) is assumed to cost this many seconds.
UNMEASURED_FILE_S = 20.0


# workerinput key: where a worker writes the file -> group map for the controller.
GROUPS_FILE_KEY = "gatemix_groups_file"


def controller_groups_file() -> Path:
    """The map's path for this run (called on the controller: its pid names the run)."""
    return Path(tempfile.gettempdir()) / f"gatemix-xdist-groups-{os.getpid()}.json"


class GroupScheduling(LoadScopeScheduling):
    """xdist's scope scheduling, a scope being a group of ``file_groups``, in collection order."""

    def __init__(self, config: pytest.Config, log=None) -> None:
        super().__init__(config, log)
        self.groups: dict[str, str] | None = None

    def _split_scope(self, nodeid: str) -> str:
        if self.groups is None:  # first called once every worker has collected (and written)
            self.groups = json.loads(controller_groups_file().read_text())
        path = nodeid.split("::")[0]
        return self.groups.get(path, path)


def file_groups(items: list[pytest.Item]) -> dict[str, str]:
    """Test file -> its xdist group: its session server's group if it uses one, else itself."""
    servers_of_file: dict[str, set[str]] = {}
    for item in items:
        path = item.nodeid.split("::")[0]
        servers_of_file.setdefault(path, set()).update(
            name for name in SHARED_SERVERS if name in item.fixturenames
        )
    group_of_server = server_groups(servers_of_file.values())
    return {
        path: group_of_server[min(servers)] if servers else path
        for path, servers in servers_of_file.items()
    }


def server_groups(server_sets) -> dict[str, str]:
    """Server fixture -> its group's name. Servers a file uses together share a group (else that
    file's worker would start one of them again); the others have one each, run side by side."""
    members: dict[str, set[str]] = {}
    for servers in server_sets:
        joined = set(servers).union(*(members.get(name, ()) for name in servers))
        for name in joined:
            members[name] = joined
    return {name: "session servers: " + ", ".join(sorted(group)) for name, group in members.items()}


def measured_seconds() -> dict[str, float]:
    """Test file -> seconds, as last measured (``durations.json``); empty when none was."""
    if not DURATIONS_FILE.is_file():
        return {}
    return json.loads(DURATIONS_FILE.read_text())


def group_seconds(groups: dict[str, str], file_seconds: dict[str, float]) -> dict[str, float]:
    """Group -> the measured seconds of its files, summed."""
    totals: dict[str, float] = {}
    for path, group in groups.items():
        totals[group] = totals.get(group, 0.0) + file_seconds.get(path, UNMEASURED_FILE_S)
    return totals


def start_order(seconds: dict[str, float], waiting: set[str], workers: int) -> list[str]:
    """Groups longest first, except that of the first ``workers`` at most one is ``waiting``
    (needs the shared build): the longest of those, beside the longest groups that are not.

    ``seconds`` is in first-seen order, which breaks ties.
    """
    longest_first = sorted(seconds, key=lambda group: -seconds[group])
    starting: list[str] = []
    for group in longest_first:
        if len(starting) == workers:
            break
        if group not in waiting or not waiting & set(starting):
            starting.append(group)
    return starting + [group for group in longest_first if group not in starting]


def record_seconds(file_seconds: dict[str, float]) -> None:
    """Write what this run measured, per file, for the next run's order."""
    rounded = {path: round(seconds, 1) for path, seconds in sorted(file_seconds.items())}
    write_atomically(DURATIONS_FILE, json.dumps(rounded, indent=1) + "\n")


def is_heavy(item: pytest.Item) -> bool:
    return item.get_closest_marker("slow") is not None or bool(HEAVY_FIXTURES & set(item.fixturenames))


def schedule(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark heavy tests slow, group tests by what they share, order groups longest first (in place).

    Under xdist the worker also writes the groups where the controller reads them.
    """
    groups = file_groups(items)
    groups_file = getattr(config, "workerinput", {}).get(GROUPS_FILE_KEY)
    if groups_file:
        write_atomically(groups_file, json.dumps(groups))
    group_of = {}
    waiting = set()
    for item in items:
        group = groups[item.nodeid.split("::")[0]]
        group_of[item.nodeid] = group
        if is_heavy(item):
            item.add_marker(pytest.mark.slow)
        if SHARED_BUILD_FIXTURE in item.fixturenames:
            waiting.add(group)
    seconds = group_seconds(groups, measured_seconds())  # in first-seen order
    workers = getattr(config, "workerinput", {}).get("workercount", 1)
    rank = {group: index for index, group in enumerate(start_order(seconds, waiting, workers))}
    items.sort(key=lambda item: rank[group_of[item.nodeid]])
