"""One real ``gatemix serve`` process for the server tests, talked to over loopback.

The server serves the tiny demo composite (the session ``composite_dir``
fixture), or the folder named by ``GATEMIX_TEST_COMPOSITE``. It runs with API
keys, so every client here sends one; the auth tests leave it out on purpose.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

API_KEY = "test-key-1"
SECOND_API_KEY = "test-key-2"
ENSEMBLE = "gatemix-test"
MAX_N = 4
STARTUP_TIMEOUT_S = 600  # engine start; minutes on a busy shared CPU


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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def server_model_dir(request) -> Path:
    override = os.environ.get("GATEMIX_TEST_COMPOSITE")
    if override:
        return Path(override)
    return request.getfixturevalue("composite_dir")


def _wait_until_healthy(proc: subprocess.Popen, url: str, log_path: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-4000:]
            raise RuntimeError(f"gatemix serve exited with {proc.returncode}:\n{tail}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"gatemix serve not healthy after {STARTUP_TIMEOUT_S}s; log in {log_path}")


@pytest.fixture(scope="session")
def server(server_model_dir, tmp_path_factory):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path_factory.mktemp("gatemix-serve") / "server.log"
    command = [
        sys.executable,
        "-m",
        "gatemix.cli",
        "serve",
        "--model-dir",
        str(server_model_dir),
        "--served-model-name",
        ENSEMBLE,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--max-model-len",
        "256",
        "--max-num-seqs",
        "16",
        "--kv-cache-gib",
        "1",
        "--enforce-eager",
        "--max-n",
        str(MAX_N),
        "--api-key",
        API_KEY,
        "--api-key",
        SECOND_API_KEY,
        "--log-level",
        "warning",
    ]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        _wait_until_healthy(proc, url, log_path)
        models = httpx.get(
            f"{url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}
        ).json()
        experts = [card["id"] for card in models["data"] if card["id"] != ENSEMBLE]
        yield Server(url, ENSEMBLE, experts, Path(server_model_dir), log_path)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


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
