"""The student folder is a plain model folder: vLLM serves it alone and it answers through ``openai``."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _server_harness():
    """tests/server/server_harness.py, the one way the tests start ``gatemix serve``."""
    if "server_harness" in sys.modules:  # imported already by the server tests
        return sys.modules["server_harness"]
    path = Path(__file__).parents[1] / "server" / "server_harness.py"
    spec = importlib.util.spec_from_file_location("server_harness", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["server_harness"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_student_folder_loads_in_vllm_and_answers_through_openai(tiny_student, tmp_path):
    pytest.importorskip("vllm")
    openai = pytest.importorskip("openai")
    config = json.loads((tiny_student / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "gatemix" not in config
    harness = _server_harness()
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
