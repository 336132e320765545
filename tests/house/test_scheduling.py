"""The suite's order across xdist workers (``tests/scheduling.py``): longest first, one demo build
waited on, one group a session server (servers used together share one)."""

from __future__ import annotations

from scheduling import server_groups, start_order


def test_groups_run_longest_first_when_none_waits_on_the_build():
    seconds = {"short": 10.0, "long": 300.0, "middle": 100.0}
    assert start_order(seconds, waiting=set(), workers=3) == ["long", "middle", "short"]


def test_the_other_workers_start_with_the_longest_groups_that_need_no_build():
    seconds = {"servers": 400.0, "exactness": 300.0, "architectures": 140.0, "lora": 130.0, "spec": 120.0}
    waiting = {"servers", "exactness", "spec"}
    assert start_order(seconds, waiting, workers=3) == ["servers", "architectures", "lora", "exactness", "spec"]


def test_one_waiting_group_starts_even_behind_a_longer_free_one():
    seconds = {"free": 500.0, "demo": 400.0, "demo too": 300.0, "small": 10.0}
    assert start_order(seconds, {"demo", "demo too"}, workers=3) == ["free", "demo", "small", "demo too"]


def test_one_worker_or_too_few_free_groups_keep_every_group_once():
    seconds = {"a": 400.0, "b": 300.0, "free": 10.0}
    assert start_order(seconds, {"a", "b"}, workers=1) == ["a", "b", "free"]
    assert start_order(seconds, {"a", "b"}, workers=3) == ["a", "free", "b"]


def test_ties_keep_the_order_groups_were_first_seen_in():
    seconds = {"seen first": 50.0, "seen second": 50.0, "longer": 60.0}
    assert start_order(seconds, set(), workers=2) == ["longer", "seen first", "seen second"]


def test_servers_no_file_uses_together_get_a_group_each():
    groups = server_groups([{"server"}, set(), {"routed_server"}, {"server"}])
    assert groups == {"server": "session servers: server", "routed_server": "session servers: routed_server"}


def test_servers_a_file_uses_together_share_one_group_transitively():
    groups = server_groups([{"a"}, {"b"}, {"c"}, {"a", "b"}, {"b", "c"}, {"d"}])
    assert {groups[name] for name in "abc"} == {"session servers: a, b, c"}
    assert groups["d"] == "session servers: d"
