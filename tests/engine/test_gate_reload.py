"""A gate swapped while the engine serves: new requests get it, requests in flight keep theirs.

The engine is driven step by step (``LLMEngine.add_request`` / ``step``), so the
swap lands between two steps of a request that is mid-generation, exactly where
the server's ``collective_rpc`` lands it. Mixture log-probs are checked against
transformers experts mixed with each gate's fixed weights.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM
from vllm import SamplingParams

from gatemix.engine.composite_folder import GATE_SUBDIR, CompositeInfo
from gatemix.engine.engine_config import build_offline_engine, stopping
from gatemix.engine.gate_reload import RELOAD_METHOD
from gatemix.engine.pack import pack_composite, parse_gate_spec
from gatemix.engine.request_gates import gate_request_args
from gatemix.expert_folder import read_expert
from gatemix.gate.artifact import save_router

OLD, NEW = [0.8, 0.1, 0.1], [0.1, 0.1, 0.8]
STEPS = 10


@pytest.fixture(scope="module")
def reload_setup(demo_paths, tmp_path_factory):
    root = tmp_path_factory.mktemp("reload")
    experts = [read_expert(path, name) for name, path in demo_paths.expert_dirs.items()]
    composite = root / "composite"
    pack_composite([e.path for e in experts], composite, gate=",".join(map(str, OLD)), names=[e.name for e in experts])
    new_gate = save_router(parse_gate_spec(",".join(map(str, NEW)), experts), root / "new-gate")
    other_order = parse_gate_spec("uniform", experts[::-1])
    save_router(other_order, root / "other-order")
    (root / "corrupt").mkdir()
    (root / "corrupt" / "router.json").write_text("{not json")
    (root / "corrupt" / "router.safetensors").write_bytes(b"\0" * 16)
    with stopping(build_offline_engine(composite, dtype="float32", max_model_len=256, max_num_seqs=4)) as llm:
        yield llm, root, new_gate.version


def _reference(demo_paths, tokens: list[int], weights: list[float]) -> torch.Tensor:
    experts = [AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval() for p in demo_paths.expert_dirs.values()]
    with torch.no_grad():
        probs = [torch.softmax(m(torch.tensor([tokens])).logits[0].double(), -1) for m in experts]
    return torch.log(sum(w * p for w, p in zip(weights, probs)))  # (T, V): position p predicts p + 1


def _finish(engine, outputs: dict) -> None:
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                outputs[output.request_id] = output


@pytest.mark.slow
def test_a_swap_between_steps_serves_new_requests_and_spares_those_in_flight(reload_setup, demo_paths):
    llm, root, new_version = reload_setup
    engine = llm.llm_engine
    params = SamplingParams(max_tokens=STEPS, temperature=0.0, ignore_eos=True, logprobs=3)
    prompt = list(range(40, 60))
    engine.add_request("before", {"prompt_token_ids": prompt}, params)
    outputs: dict = {}
    for _ in range(3):  # the first request is mid-generation
        for output in engine.step():
            outputs[output.request_id] = output
    assert not outputs.get("before") or not outputs["before"].finished
    results = llm.collective_rpc(RELOAD_METHOD, args=(str(root / "new-gate"),))
    assert results[0]["version"] == new_version
    engine.add_request("after", {"prompt_token_ids": prompt}, params)
    _finish(engine, outputs)
    for request_id, weights in (("before", OLD), ("after", NEW)):
        generated = outputs[request_id].outputs[0]
        expected = _reference(demo_paths, prompt + list(generated.token_ids), weights)
        for index, top in enumerate(generated.logprobs):
            for token_id, logprob in top.items():
                assert abs(logprob.logprob - expected[len(prompt) - 1 + index, token_id].item()) < 1e-3, request_id


@pytest.mark.slow
@pytest.mark.parametrize("artifact, message", [
    ("other-order", "in that order"), ("corrupt", "unreadable router artifact"), ("missing", "not a router artifact"),
])
def test_a_gate_for_other_experts_or_a_corrupt_one_is_refused_and_the_old_one_serves(
    reload_setup, demo_paths, artifact, message
):
    llm, root, new_version = reload_setup
    assert llm.collective_rpc(RELOAD_METHOD, args=(str(root / "new-gate"),))[0]["version"] == new_version
    with pytest.raises(Exception, match=message):
        llm.collective_rpc(RELOAD_METHOD, args=(str(root / artifact),))
    prompt = list(range(70, 90))
    output = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(max_tokens=1, logprobs=3), use_tqdm=False)[0]
    expected = _reference(demo_paths, prompt, NEW)  # the gate before the refused swap still serves
    for token_id, logprob in output.outputs[0].logprobs[0].items():
        assert abs(logprob.logprob - expected[-1, token_id].item()) < 1e-3


@pytest.mark.slow
def test_a_gate_the_server_still_has_requests_for_outlives_any_number_of_swaps(reload_setup, demo_paths):
    """A request that waited in the queue through several swaps still gets the gate it was promised."""
    llm, root, _ = reload_setup
    experts = [read_expert(path, name) for name, path in demo_paths.expert_dirs.items()]
    promised = CompositeInfo.read(root / "composite").gate_version  # the OLD gate, served at start
    assert llm.collective_rpc(RELOAD_METHOD, args=(str(root / "composite" / GATE_SUBDIR),))[0]["version"] == promised
    for index, weights in enumerate(([0.2, 0.4, 0.4], [0.4, 0.2, 0.4], [0.4, 0.4, 0.2], [0.3, 0.3, 0.4], NEW)):
        save_router(parse_gate_spec(",".join(map(str, weights)), experts), root / f"swap-{index}")
        llm.collective_rpc(RELOAD_METHOD, args=(str(root / f"swap-{index}"), [promised]))
    prompt = list(range(90, 110))
    params = SamplingParams(max_tokens=1, logprobs=3, extra_args=gate_request_args(gate_version=promised))
    output = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]
    expected = _reference(demo_paths, prompt, OLD)
    for token_id, logprob in output.outputs[0].logprobs[0].items():
        assert abs(logprob.logprob - expected[-1, token_id].item()) < 1e-3
