"""A learned router runs in the engine exactly as offline, token by token.

The router here is random (not fitted), which is the harder case: its weights
vary strongly with the context, so any misalignment between the engine's
per-token weights and the offline router's would show. This file runs the
router with its own causal Llama, whose attention layers live in vLLM's paged KV
cache next to the experts'; the head on the experts' states alone is the routed
session server's gate, held to the offline router's weights and log-probs through
the server (``tests/server/test_routed_mixture_report.py``).
"""

from __future__ import annotations

import json
import time

import msgspec
import pytest
import torch
import zmq
from random_router import random_router_artifact
from vllm import SamplingParams

from gatemix.distill.teacher import EnsembleTeacher
from gatemix.engine.engine_config import build_offline_engine, stopping
from gatemix.engine.pack import pack_composite
from gatemix.engine.request_gates import gate_request_args
from gatemix.gate.router import context_config_like

STEPS = 12


@pytest.fixture(scope="module")
def routed_composite(demo_paths, tmp_path_factory):
    expert_config = json.loads((next(iter(demo_paths.expert_dirs.values())) / "config.json").read_text())
    artifact = random_router_artifact(demo_paths.expert_dirs, context_config_like(expert_config, num_layers=1))
    out = tmp_path_factory.mktemp("routed-context") / "composite"
    pack_composite(list(demo_paths.expert_dirs.values()), out, gate=artifact)
    return out


def _collect_trace(socket) -> dict[int, list[float]]:
    weights: dict[int, list[float]] = {}
    deadline = time.time() + 5
    while time.time() < deadline:
        try:
            payload = socket.recv(zmq.NOBLOCK)
        except zmq.Again:
            if len(weights) >= STEPS:
                break
            time.sleep(0.05)
            continue
        for _trace_id, index, row, _conditioning in msgspec.msgpack.decode(payload):
            weights[index] = row
    return weights


def test_engine_weights_and_logprobs_match_the_offline_router(routed_composite, demo_paths, tmp_path):
    context = zmq.Context()
    socket = context.socket(zmq.PULL)
    address = f"ipc://{tmp_path}/trace.sock"
    socket.bind(address)
    try:
        with stopping(build_offline_engine(routed_composite, dtype="float32", max_model_len=256,
                                           max_num_seqs=4)) as llm:
            prompt = list(range(40, 60))
            params = SamplingParams(
                max_tokens=STEPS, temperature=0.0, ignore_eos=True, logprobs=5,
                extra_args=gate_request_args(trace_id="t", trace_to=address),
            )
            output = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0].outputs[0]
            engine_weights = _collect_trace(socket)
    finally:
        socket.close()
        context.term()

    teacher = EnsembleTeacher.load(routed_composite, list(demo_paths.expert_dirs.values()))
    sequence = torch.tensor([prompt + list(output.token_ids)])
    mixture, log_weights = teacher(sequence)
    offline_weights = log_weights[0].exp()  # (T, K); position p decides token p + 1
    assert sorted(engine_weights) == list(range(STEPS))
    spread = offline_weights[len(prompt) - 1 :].std(0).max().item()
    assert spread > 0.01, "the random router should vary with the context"
    for index, row in engine_weights.items():
        position = len(prompt) - 1 + index
        torch.testing.assert_close(torch.tensor(row), offline_weights[position], atol=1e-4, rtol=0)
        for token_id, logprob in output.logprobs[index].items():
            assert abs(logprob.logprob - mixture[0, position, token_id].item()) < 1e-3
