"""One real ``gatemix serve`` process for the server tests, talked to over loopback.

The server serves the tiny demo's project file (``gatemix serve --project``, the
user's path: the project's composite is packed from its experts), or the folder
named by ``GATEMIX_TEST_COMPOSITE``. It runs with API
keys, so every client here sends one; the auth tests leave it out on purpose.

A second server (``routed_server``, started only by the tests that ask for it)
serves a composite with a random router, whose per-token weights vary with the
context, on two engine replicas (vLLM's data parallelism), with small limits and
tool calling.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from filelock import FileLock
from server_harness import ENSEMBLE, serving

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
    pid: int  # the API server process (the engine core is its child)
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
    from gatemix.engine.project_composite import ensure_composite
    from gatemix.project import load_project

    # Under xdist another worker may pack the same project's composite at the same moment.
    with FileLock(str(served_project.parent / ".composite.lock")):
        return ensure_composite(load_project(served_project)).path


@pytest.fixture(scope="session")
def server(served_project, server_model_dir, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("gatemix-serve")
    keys = ("--max-n", str(MAX_N), "--api-key", API_KEY, "--api-key", SECOND_API_KEY)
    with serving(server_model_dir, log_dir, *keys, project=served_project) as process:
        url = process.url
        models = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).json()
        experts = [card["id"] for card in models["data"] if card["id"] != ENSEMBLE]
        yield Server(url, ENSEMBLE, experts, Path(server_model_dir), process.log_path, process.proc.pid)


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


# ---------------------------------------------------------------- the fake stack (fast tier)


@pytest.fixture
def stack():
    """The real serving classes, routes and middleware around a fake engine (``fake_engine.py``)."""
    from fake_engine import serving_app

    return serving_app()


@pytest.fixture
def api(stack):
    """A client of the fake stack (not ``http``: no real server here)."""
    from fastapi.testclient import TestClient

    with TestClient(stack.app) as client:
        yield client


# ---------------------------------------------------------------- the routed server

TOOLS_TEMPLATE = Path(__file__).with_name("tools_chat_template.jinja")
ROUTED_REPLICAS = 2  # --data-parallel-size
ROUTED_MAX_NUM_SEQS = 2  # a replica
ROUTED_MAX_QUEUED = 2
ROUTED_MAX_OUTPUT_TOKENS = 1000


@pytest.fixture(scope="session")
def routed_composite(demo_paths, tmp_path_factory) -> Path:
    """The demo experts packed with a random (not fitted) router: per-token weights that vary
    sharply with the context, so a trace misaligned by one token shows (as in
    tests/engine/test_learned_router.py)."""
    from random_router import random_router_artifact

    from gatemix.engine.pack import pack_composite

    artifact = random_router_artifact(demo_paths.expert_dirs)
    out = tmp_path_factory.mktemp("routed") / "composite"
    pack_composite(list(demo_paths.expert_dirs.values()), out, gate=artifact)
    return out


ADMIN_KEY = "test-admin-key"


@dataclass(frozen=True)
class RoutedServer:
    base_url: str
    model_dir: Path
    experts: list[str]
    log_path: Path
    pid: int
    gate_artifact: Path  # what SIGHUP re-reads (empty until a test writes an artifact there)


@pytest.fixture(scope="session")
def routed_server(routed_composite, tmp_path_factory):
    """A second server, on the random-router composite: two engine replicas (each request runs
    on one; the tests of ``--data-parallel-size`` share this server instead of starting their
    own), small limits (2 engine slots a replica, 2 queued, 1000 output tokens a request), tool
    calling (a Hermes template and parser) and the admin API (gate reloads; the test that swaps
    its gate swaps the original back)."""
    gate_artifact = tmp_path_factory.mktemp("sighup-gate")
    flags = (
        "--data-parallel-size", str(ROUTED_REPLICAS),
        "--max-num-seqs", str(ROUTED_MAX_NUM_SEQS),
        "--max-queued-requests", str(ROUTED_MAX_QUEUED),
        "--max-output-tokens", str(ROUTED_MAX_OUTPUT_TOKENS),
        "--chat-template", str(TOOLS_TEMPLATE),
        "--tool-call-parser", "hermes",
        "--admin-key", ADMIN_KEY,
        "--gate-artifact", str(gate_artifact),
    )
    log_dir = tmp_path_factory.mktemp("gatemix-serve-routed")
    with serving(routed_composite, log_dir, *flags) as process:
        models = httpx.get(f"{process.url}/v1/models").json()
        experts = [card["id"] for card in models["data"] if card["id"] != ENSEMBLE]
        yield RoutedServer(process.url, routed_composite, experts, process.log_path, process.proc.pid, gate_artifact)


@pytest.fixture(scope="session")
def routed_client(routed_server):
    import openai

    return openai.OpenAI(
        base_url=f"{routed_server.base_url}/v1", api_key="none", max_retries=0, timeout=120
    )


@pytest.fixture(scope="session")
def offline_router(routed_server, demo_paths):
    """The random router run offline, outside vLLM: the reference for the engine's per-token weights."""
    from gatemix.distill.teacher import EnsembleTeacher

    return EnsembleTeacher.load(routed_server.model_dir, list(demo_paths.expert_dirs.values()))
