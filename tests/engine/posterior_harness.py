"""Helpers of the engine's posterior-state tests; their fixtures are in ``conftest.py``.

The composite's router is random (not fitted) with a posterior of forgetting
0.9 and a head that reads the posterior's log-weights: its weights move with
every token of the prefix, so a token folded twice, missed, or folded at the
wrong position would show. The reference is the offline router over
``transformers`` experts (``EnsembleTeacher``), on the whole sequence at once,
which is what the engine computes with prefix caching off.
"""

from __future__ import annotations

import time

import msgspec
import torch
import zmq

GENERATED = 32
FORGETTING = 0.9


def engine_counter(llm, name: str) -> float:
    """A vLLM metric's total over its labels (a metric without a value counts 0)."""
    return sum(getattr(metric, "value", 0) for metric in llm.get_metrics() if metric.name == name)


def token_prompts(count: int, length: int, shared: int = 0) -> list[list[int]]:
    """``count`` prompts of ``length`` token ids whose first ``shared`` tokens are the same."""
    return [[(17 + 7 * i + 13 * j * (i >= shared)) % 1900 + 20 for i in range(length)] for j in range(count)]


def chunked_prompts() -> list[list[int]]:
    return [list(range(40 + 3 * i, 40 + 3 * i + 37)) for i in range(2)]


def collect_trace(socket, expected: dict[str, int]) -> dict[str, dict[int, tuple[list[float], list[int]]]]:
    """Each trace's records, index -> (weights, the draft tokens they assume), the socket drained.

    A later record of an index overwrites an earlier one, as in the server's receiver.
    """
    records: dict[str, dict[int, tuple[list[float], list[int]]]] = {trace: {} for trace in expected}
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            payload = socket.recv(zmq.NOBLOCK)
        except zmq.Again:
            if all(len(records[t]) >= n for t, n in expected.items()):
                return records
            time.sleep(0.05)
            continue
        for trace_id, index, row, conditioning in msgspec.msgpack.decode(payload):
            records.setdefault(trace_id, {})[index] = (row, conditioning)
    return records


def accepted_weights(records: dict[int, tuple[list[float], list[int]]], output_ids: list[int]) -> dict[int, list[float]]:
    """The weights of the output's tokens: records whose assumed draft tokens are the output's."""
    return {
        index: row for index, (row, conditioning) in records.items()
        if index < len(output_ids) and output_ids[index - len(conditioning) : index] == conditioning
    }


def check_generation(teacher, prompt, output, traced: dict | None, greedy: bool = False,
                     check_logprobs: bool = True) -> None:
    """Per-token weights within 1e-4 (when traced), returned top logprobs within 1e-3, greedy tokens the argmax."""
    sequence = torch.tensor([prompt + list(output.token_ids)])
    mixture, log_weights = teacher(sequence)
    offline = log_weights[0].exp()  # position p's weights decide token p + 1
    if traced is not None:
        traced = accepted_weights(traced, list(output.token_ids))
        assert sorted(traced) == list(range(len(output.token_ids)))
        assert offline.std(0).max() > 0.01, "the weights should move with the prefix"
        for index, row in traced.items():
            torch.testing.assert_close(torch.tensor(row), offline[len(prompt) - 1 + index], atol=1e-4, rtol=0)
    for index, top in enumerate(output.logprobs if check_logprobs else []):
        step = mixture[0, len(prompt) - 1 + index]  # (V,)
        for token_id, logprob in top.items():
            assert abs(logprob.logprob - step[token_id].item()) < 1e-3
        if greedy:  # the same greedy token as the exact mixture (up to a near-tie)
            assert step[output.token_ids[index]] >= step.max() - 1e-4, index


