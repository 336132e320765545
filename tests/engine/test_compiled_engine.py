"""The composite under vLLM's torch.compile (``enforce_eager=False``) gives the eager mixture.

``ExpertEnsemble`` is vLLM-compiled (``@support_torch_compile``); the router,
the per-request overrides and the mixing stay outside the graph. On CPU this
is Inductor's C++ backend; CUDA graphs are not exercised here (no GPU).
"""

from __future__ import annotations

from vllm import SamplingParams

from gatemix.engine.engine_config import build_offline_engine, stopping

PROMPTS = [list(range(20 + 7 * i, 40 + 7 * i)) for i in range(3)]


def _generate(model_dir, eager: bool):
    with stopping(build_offline_engine(
        model_dir, dtype="float32", max_model_len=128, max_num_seqs=4, enforce_eager=eager
    )) as llm:
        params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, logprobs=10)
        prompts = [{"prompt_token_ids": ids} for ids in PROMPTS]
        return [out.outputs[0] for out in llm.generate(prompts, params, use_tqdm=False)]


def test_compiled_composite_matches_eager(composite_dir):
    eager, compiled = _generate(composite_dir, True), _generate(composite_dir, False)
    for a, b in zip(eager, compiled):
        assert a.token_ids == b.token_ids
        for top_a, top_b in zip(a.logprobs, b.logprobs):
            shared = set(top_a) & set(top_b)
            assert len(shared) >= 8
            assert max(abs(top_a[t].logprob - top_b[t].logprob) for t in shared) < 1e-3
