"""A posterior composite and its exact offline reference, shared by the engine's posterior-state tests.

The composite's router is random (not fitted) with a posterior of forgetting
0.9 and a head that reads the posterior's log-weights: its weights move with
every token of the prefix, so a token folded twice, missed, or folded at the
wrong position would show. The reference is the offline router over
``transformers`` experts (``EnsembleTeacher``), on the whole sequence at once,
which is what the engine computes with prefix caching off.
"""

from __future__ import annotations

import json
import math
import time

import msgspec
import pytest
import torch
import zmq

from gatemix.distill.teacher import EnsembleTeacher
from gatemix.engine.pack import pack_composite
from gatemix.expert_folder import expert_hash
from gatemix.gate.artifact import RouterArtifact
from gatemix.gate.router import HiddenStateRouter, RouterForm

GENERATED = 32
FORGETTING = 0.9


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


def chunked_prompts() -> list[list[int]]:
    return [list(range(40 + 3 * i, 40 + 3 * i + 37)) for i in range(2)]


def collect_trace(socket, expected: dict[str, int]) -> dict[str, dict[int, list[float]]]:
    weights: dict[str, dict[int, list[float]]] = {trace: {} for trace in expected}
    deadline = time.time() + 10
    while time.time() < deadline and any(len(weights[t]) < n for t, n in expected.items()):
        try:
            payload = socket.recv(zmq.NOBLOCK)
        except zmq.Again:
            time.sleep(0.05)
            continue
        for trace_id, index, row in msgspec.msgpack.decode(payload):
            weights.setdefault(trace_id, {})[index] = row
    return weights


def check_generation(teacher, prompt, output, traced: dict[int, list[float]] | None, greedy: bool = False) -> None:
    """Per-token weights within 1e-4 (when traced), returned top logprobs within 1e-3, greedy tokens the argmax."""
    sequence = torch.tensor([prompt + list(output.token_ids)])
    mixture, log_weights = teacher(sequence)
    offline = log_weights[0].exp()  # position p's weights decide token p + 1
    if traced is not None:
        assert sorted(traced) == list(range(len(output.token_ids)))
        assert offline.std(0).max() > 0.01, "the weights should move with the prefix"
        for index, row in traced.items():
            torch.testing.assert_close(torch.tensor(row), offline[len(prompt) - 1 + index], atol=1e-4, rtol=0)
    for index, top in enumerate(output.logprobs):
        step = mixture[0, len(prompt) - 1 + index]  # (V,)
        for token_id, logprob in top.items():
            assert abs(logprob.logprob - step[token_id].item()) < 1e-3
        if greedy:  # the same greedy token as the exact mixture (up to a near-tie)
            assert step[output.token_ids[index]] >= step.max() - 1e-4, index


