"""One real ``gatemix serve`` process for the server tests, talked to over loopback.

The server serves the tiny demo's project file (``gatemix serve --project``, the
user's path: the project's composite is packed from its experts), or the folder
named by ``GATEMIX_TEST_COMPOSITE``. It runs with API
keys, so every client here sends one; the auth tests leave it out on purpose.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from server_harness import ENSEMBLE, running_server  # noqa: F401  (tests import ENSEMBLE from here)

API_KEY = "test-key-1"
SECOND_API_KEY = "test-key-2"
MAX_N = 4


@dataclass(frozen=True)
class Server:
    base_url: str  # http://127.0.0.1:PORT
    ensemble: str
    experts: list[str]
    model_dir: Path
    log_path: Path
    api_keys: tuple[str, ...] = (API_KEY, SECOND_API_KEY)
    max_n: int = MAX_N

    def log_tail(self, lines: int = 60) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])


@pytest.fixture(scope="session")
def served_project(request) -> Path | None:
    """The demo's project file, served as a user's would be (None with GATEMIX_TEST_COMPOSITE)."""
    if os.environ.get("GATEMIX_TEST_COMPOSITE"):
        return None
    return request.getfixturevalue("demo_paths").project_file


@pytest.fixture(scope="session")
def server_model_dir(served_project) -> Path:
    """The folder the server runs: the project's composite (packed as `serve --project` would)."""
    if served_project is None:
        return Path(os.environ["GATEMIX_TEST_COMPOSITE"])
    from gatemix.engine.composite_folder import ensure_composite
    from gatemix.project import load_project

    return ensure_composite(load_project(served_project)).path


@pytest.fixture(scope="session")
def server(served_project, server_model_dir, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("gatemix-serve")
    keys = ("--max-n", str(MAX_N), "--api-key", API_KEY, "--api-key", SECOND_API_KEY)
    with running_server(server_model_dir, log_dir, *keys, project=served_project) as (url, log_path):
        models = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).json()
        experts = [card["id"] for card in models["data"] if card["id"] != ENSEMBLE]
        yield Server(url, ENSEMBLE, experts, Path(server_model_dir), log_path)


@pytest.fixture(scope="session")
def client(server):
    import openai

    return openai.OpenAI(
        base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=120
    )


@pytest.fixture(scope="session")
def http(server):
    """A raw HTTP client with the key, for requests the openai client cannot send."""
    with httpx.Client(
        base_url=server.base_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120
    ) as http_client:
        yield http_client


@pytest.fixture(scope="session")
def tokenizer(server):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(server.model_dir))
