"""Fixtures of the engine's posterior-state tests: a posterior composite, its exact reference, a trace socket.

Module-scoped: each test module that asks builds its own (``posterior_harness``
says what they are).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import zmq

from gatemix.distill.teacher import EnsembleTeacher
from gatemix.engine.pack import pack_composite
from gatemix.expert_folder import expert_hash
from gatemix.gate.artifact import RouterArtifact
from gatemix.gate.router import HiddenStateRouter, RouterForm
from tests.engine.posterior_harness import FORGETTING


@pytest.fixture(scope="module")
def posterior_composite(demo_paths, tmp_path_factory):
    names = list(demo_paths.expert_dirs)
    torch.manual_seed(3)
    hidden = json.loads((demo_paths.expert_dirs[names[0]] / "config.json").read_text())["hidden_size"]
    router = HiddenStateRouter(RouterForm(len(names), hidden, 16, posterior=True, posterior_features=True))
    with torch.no_grad():
        router.proj_in.weight.mul_(3.0)
        router.proj_out.weight.mul_(3.0)
        router.prior_logits.copy_(torch.tensor([0.8, -0.5, 0.1]))
        router.forgetting_raw.fill_(math.log(math.expm1(-math.log(FORGETTING))))  # lambda = 0.9
    assert abs(router.forgetting.item() - FORGETTING) < 1e-6
    artifact = RouterArtifact(
        router=router, expert_names=names,
        expert_hashes={n: expert_hash(p) for n, p in demo_paths.expert_dirs.items()}, method="random-test",
    )
    out = tmp_path_factory.mktemp("posterior") / "composite"
    pack_composite(list(demo_paths.expert_dirs.values()), out, gate=artifact)
    return out


@pytest.fixture(scope="module")
def teacher(posterior_composite, demo_paths):
    return EnsembleTeacher.load(posterior_composite, list(demo_paths.expert_dirs.values()))


@pytest.fixture(scope="module")
def trace_socket(tmp_path_factory):
    context = zmq.Context()
    socket = context.socket(zmq.PULL)
    address = f"ipc://{tmp_path_factory.mktemp('trace')}/trace.sock"
    socket.bind(address)
    yield socket, address
    socket.close()
    context.term()
