"""Starting a real ``gatemix serve`` process on loopback, shared by the server tests."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

ENSEMBLE = "gatemix-test"
STARTUP_TIMEOUT_S = 600  # engine start; minutes on a busy shared CPU


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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


@dataclass
class ServerProcess:
    """A started ``gatemix serve`` process: its base URL, its log, the process itself."""

    url: str
    log_path: Path
    proc: subprocess.Popen

    def wait_until_healthy(self) -> None:
        _wait_until_healthy(self.proc, self.url, self.log_path)

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_server(
    model_dir: Path | None, log_dir: Path, *extra_args: str, env: dict | None = None,
    project: Path | None = None,
) -> ServerProcess:
    """Launch ``gatemix serve`` of a folder or a project on a free loopback port (no wait)."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = log_dir / "server.log"
    what = ["--model-dir", str(model_dir)] if project is None else ["--project", str(project)]
    command = [
        sys.executable, "-m", "gatemix.cli", "serve",
        *what,
        "--served-model-name", ENSEMBLE,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--dtype", "float32",
        "--max-model-len", "256",
        "--max-num-seqs", "16",
        "--kv-cache-gib", "1",
        "--enforce-eager",
        "--log-level", "warning",
        *extra_args,
    ]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", **(env or {}))
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    return ServerProcess(url, log_path, proc)


@contextlib.contextmanager
def running_server(
    model_dir: Path | None, log_dir: Path, *extra_args: str, env: dict | None = None,
    project: Path | None = None,
):
    """Start ``gatemix serve`` of a folder or a project on a free loopback port; yield its base URL; stop it."""
    with serving(model_dir, log_dir, *extra_args, env=env, project=project) as server:
        yield server.url, server.log_path


@contextlib.contextmanager
def serving(
    model_dir: Path | None, log_dir: Path, *extra_args: str, env: dict | None = None,
    project: Path | None = None,
):
    """``running_server``, yielding the ``ServerProcess`` (for tests that need its pid)."""
    server = start_server(model_dir, log_dir, *extra_args, env=env, project=project)
    try:
        server.wait_until_healthy()
        yield server
    finally:
        server.stop()


def post_gate(url: str, artifact: Path | None, headers: dict[str, str]) -> httpx.Response:
    """``POST /admin/gate``: serve the gate artifact at ``artifact`` (None: the configured one)."""
    return httpx.post(f"{url}/admin/gate", json={"path": None if artifact is None else str(artifact)},
                      headers=headers, timeout=120)


def wait_until_idle(url: str, timeout_s: float) -> dict:
    """The server's /health once nothing is admitted and nothing is left in the engine."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        health = httpx.get(f"{url}/health").json()
        if health["requests_admitted"] == 0 and health["engine_unfinished_requests"] == 0:
            return health
        time.sleep(0.05)
    raise AssertionError(f"the server did not go idle within {timeout_s} s: {health}")


def whitespace_bias(tokenizer) -> dict[str, int]:
    """logit_bias that rules out every whitespace-only token: the tiny models like JSON
    whitespace (a grammar allows any amount), and without it an object may not close."""
    texts = {token: tokenizer.decode([token]) for token in range(len(tokenizer))}
    return {str(token): -100 for token, text in texts.items() if text and not text.strip()}
