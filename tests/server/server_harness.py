"""Starting a real ``gatemix serve`` process on loopback, shared by the server tests."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
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


@contextlib.contextmanager
def running_server(
    model_dir: Path | None, log_dir: Path, *extra_args: str, env: dict | None = None,
    project: Path | None = None,
):
    """Start ``gatemix serve`` of a folder or a project on a free loopback port; yield its base URL; stop it."""
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
    try:
        _wait_until_healthy(proc, url, log_path)
        yield url, log_path
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
