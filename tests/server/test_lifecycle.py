"""The process's lifetime: a request timeout, SIGTERM's drain, and death with the engine.

Two servers of their own, started together: one is stopped with SIGTERM, the
other loses its engine core to SIGKILL (and first shows the request timeout,
set to half a second there).
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time

import httpx
import psutil
import pytest
from server_harness import ENSEMBLE, start_server, wait_until_idle

pytestmark = pytest.mark.slow

DRAIN_S = 10.0  # server A's --shutdown-timeout-s: long enough for the 500-token stream on a busy 2-core machine
TIMEOUT_S = 0.5  # server B's --request-timeout-s
SHUTDOWN_GRACE_S = 10.0  # gatemix.server.lifecycle.SHUTDOWN_GRACE_S
EXIT_ENGINE_DEAD = 4


@pytest.fixture(scope="module")
def servers(server_model_dir, tmp_path_factory):
    """``(A, B)``: A drains for 3 s on SIGTERM; B times requests out at 0.5 s, one engine slot."""
    draining = start_server(
        server_model_dir, tmp_path_factory.mktemp("serve-drain"), "--shutdown-timeout-s", str(DRAIN_S)
    )
    dying = start_server(
        server_model_dir, tmp_path_factory.mktemp("serve-die"),
        "--request-timeout-s", str(TIMEOUT_S), "--max-num-seqs", "1",
    )
    try:
        draining.wait_until_healthy()
        dying.wait_until_healthy()
        yield draining, dying
    finally:
        draining.stop()
        dying.stop()


def _events(response) -> list[dict]:
    return [json.loads(line[6:]) for line in response.iter_lines()
            if line.startswith("data: ") and line != "data: [DONE]"]


def test_a_request_past_its_timeout_is_aborted_and_answered_504(servers):
    _, server = servers
    slow = {"model": ENSEMBLE, "prompt": "abc", "n": 4, "max_tokens": 240, "ignore_eos": True}
    with httpx.Client(base_url=server.url, timeout=30) as http:
        started = time.monotonic()
        response = http.post("/v1/completions", json=slow)
        elapsed = time.monotonic() - started
        assert response.status_code == 504, response.text
        error = response.json()["error"]
        assert error["code"] == "timeout" and error["type"] == "timeout_error"
        assert TIMEOUT_S <= elapsed < TIMEOUT_S + 3
        aborted = wait_until_idle(server.url, 10)["requests_aborted"]
        assert aborted >= 4  # every choice left the engine
        # A stream has sent its 200 already: the timeout is its last event, then [DONE].
        with http.stream("POST", "/v1/completions", json={**slow, "stream": True}) as stream:
            assert stream.status_code == 200
            events = _events(stream)
        assert events[-1]["error"]["code"] == "timeout"
        assert wait_until_idle(server.url, 10)["requests_aborted"] >= aborted + 4
        good = http.post("/v1/completions", json={"model": ENSEMBLE, "prompt": "hi", "max_tokens": 2})
        assert good.status_code == 200


def _stuck_request(url: str) -> socket.socket:
    """A request whose body never ends: it stays in flight until the drain deadline."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        b'Content-Length: 1000\r\n\r\n{"prompt": "a'
    )
    return sock


def test_sigterm_drains_in_flight_requests_then_exits_by_its_deadline(servers):
    server, _ = servers
    stuck = _stuck_request(server.url)
    body = {"model": ENSEMBLE, "prompt": "abc", "max_tokens": 250, "ignore_eos": True,
            "stream": True, "n": 2, "stream_options": {"include_usage": True}}
    try:
        with (
            httpx.Client(base_url=server.url, timeout=30) as http,
            http.stream("POST", "/v1/completions", json=body) as stream,
        ):
            lines = stream.iter_lines()
            first = next(lines)
            assert first.startswith("data: ")
            started = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            with pytest.raises(httpx.TransportError):  # no new connections once draining
                httpx.get(f"{server.url}/health", timeout=2)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"  # the in-flight stream finished whole
        usage = json.loads([line for line in rest if '"usage":{' in line][-1][6:])["usage"]
        assert usage["completion_tokens"] == 500
        server.proc.wait(timeout=DRAIN_S + SHUTDOWN_GRACE_S + 10)
        elapsed = time.monotonic() - started
    finally:
        stuck.close()
    # It waited for the stuck request until the drain deadline, and not much longer.
    assert DRAIN_S - 0.5 <= elapsed <= DRAIN_S + SHUTDOWN_GRACE_S, elapsed
    assert server.proc.returncode in (0, -signal.SIGTERM), server.log_tail()
    print(f"SIGTERM: exited {server.proc.returncode} after {elapsed:.1f} s (drain {DRAIN_S} s)")


def test_the_process_exits_non_zero_within_10_s_of_its_engine_s_death(servers):
    _, server = servers
    process = psutil.Process(server.proc.pid)
    (core,) = [child for child in process.children(recursive=True) if "EngineCore" in child.name()]
    in_flight: list[str] = []

    def stream() -> None:
        body = {"model": ENSEMBLE, "prompt": "abc", "max_tokens": 240, "ignore_eos": True,
                "stream": True}
        try:
            with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as r:
                in_flight.extend(line for line in r.iter_lines() if line)
        except httpx.TransportError as exc:
            in_flight.append(f"transport error: {exc}")

    reader = threading.Thread(target=stream, daemon=True)
    reader.start()
    deadline = time.monotonic() + 10
    while not in_flight and time.monotonic() < deadline:
        time.sleep(0.01)
    killed = time.monotonic()
    core.kill()
    returncode = server.proc.wait(timeout=30)
    elapsed = time.monotonic() - killed
    reader.join(timeout=10)
    assert not reader.is_alive(), "the in-flight stream hung"
    assert returncode == EXIT_ENGINE_DEAD, server.log_tail()
    assert elapsed < 10, elapsed
    # The stream in flight ended with the engine's error, or with the connection; on a loaded
    # machine server B's own 0.5 s deadline can end it first, with its timeout error.
    last = in_flight[-1]
    ended_by_an_error = last == "data: [DONE]" and (
        "the engine has stopped" in in_flight[-2] or '"code":"timeout"' in in_flight[-2]
    )
    assert ended_by_an_error or last.startswith("transport error"), in_flight[-3:]
    print(f"engine death: exited {returncode} after {elapsed:.1f} s; stream ended {in_flight[-1][:80]!r}")
