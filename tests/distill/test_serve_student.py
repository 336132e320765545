"""The student folder is a plain model folder: vLLM serves it alone and it answers through ``openai``."""

from __future__ import annotations

import json

import pytest
import server_harness as harness

pytestmark = pytest.mark.slow


def test_the_student_folder_loads_in_vllm_and_answers_through_openai(tiny_student, tmp_path):
    pytest.importorskip("vllm")
    openai = pytest.importorskip("openai")
    config = json.loads((tiny_student / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "gatemix" not in config
    with harness.running_server(tiny_student, tmp_path) as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        assert [model.id for model in client.models.list().data] == [harness.ENSEMBLE]
        response = client.completions.create(model=harness.ENSEMBLE, prompt="def add(a, b):",
                                             max_tokens=6, temperature=0,
                                             extra_body={"ignore_eos": True})
        assert isinstance(response.choices[0].text, str) and response.usage.completion_tokens == 6
        chat = client.chat.completions.create(
            model=harness.ENSEMBLE, messages=[{"role": "user", "content": "Hello"}],
            max_completion_tokens=3, extra_body={"ignore_eos": True})
        assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == 3
