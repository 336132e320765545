"""A soak: many concurrent streams against the real server, through the official client.

``make test`` runs a small one (16 streams for 20 s); ``make soak`` the full one
(64 streams for 2 minutes): ``GATEMIX_SOAK_STREAMS`` and ``GATEMIX_SOAK_S``.
Each stream loops over completions and chat requests with ``n`` of 1 to 3,
some with a pinned mixture, some cancelled after a few chunks. It passes when
no request fails, every finished request's usage is exact, the server's
running, waiting and admitted counts end at 0, and the server's resident
memory after warm-up stays flat. Traffic goes to 127.0.0.1 only, bounded in
time (and so in count).
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from dataclasses import dataclass, field

import httpx
import psutil
import pytest

pytestmark = pytest.mark.slow

SOAK_S = float(os.environ.get("GATEMIX_SOAK_S", "20"))
STREAMS = int(os.environ.get("GATEMIX_SOAK_STREAMS", "16"))
WARMUP_FRACTION = 0.25
# Flat: what the allocator may still take after warm-up (arenas, caches), not a leak's slope.
RSS_GROWTH_LIMIT = 48 * 1024 * 1024


@dataclass
class Tally:
    requests: int = 0
    choices: int = 0
    tokens: int = 0
    cancelled: int = 0
    pinned: int = 0
    failures: list[str] = field(default_factory=list)


async def _one_request(client, server, rng: random.Random, tally: Tally) -> None:
    n = rng.choice([1, 2, 3])
    max_tokens = rng.randint(4, 40)
    pinned = rng.random() < 0.3
    cancel_after = rng.randint(1, 3) if rng.random() < 0.2 else None
    extra = {"ignore_eos": True}
    if pinned:
        weights = {server.experts[0]: 0.7, server.experts[-1]: 0.3}
        extra["mixture"] = {"weights": weights}
    common = {"model": server.ensemble, "n": n, "max_tokens": max_tokens, "stream": True,
              "stream_options": {"include_usage": True}, "temperature": 1.0,
              "seed": rng.randrange(1 << 30), "extra_body": extra}
    if rng.random() < 0.5:
        stream = await client.completions.create(prompt=f"def task_{rng.randrange(999)}(x):", **common)
    else:
        stream = await client.chat.completions.create(
            messages=[{"role": "user", "content": f"Question {rng.randrange(999)}?"}], **common
        )
    chunks, usage, reasons, mixtures = 0, None, {}, {}
    async for chunk in stream:
        chunks += 1
        if cancel_after is not None and chunks >= cancel_after:
            await stream.close()  # the client hangs up mid-stream
            tally.cancelled += 1
            return
        usage = chunk.usage or usage
        for choice in chunk.choices:
            reasons[choice.index] = choice.finish_reason or reasons.get(choice.index)
            if (choice.model_extra or {}).get("mixture"):
                mixtures[choice.index] = choice.model_extra["mixture"]
    tally.requests += 1
    tally.choices += n
    assert usage is not None and usage.completion_tokens == n * max_tokens, usage
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens > 0
    assert sorted(reasons) == list(range(n)) and set(reasons.values()) == {"length"}, reasons
    tally.tokens += usage.completion_tokens
    if pinned:
        tally.pinned += 1
        for mixture in mixtures.values():
            for name, weight in mixture["mean_weights"].items():
                assert abs(weight - weights.get(name, 0.0)) < 1e-5, mixture


async def _stream_loop(client, server, seed: int, stop_at: float, tally: Tally) -> None:
    rng = random.Random(seed)
    while time.monotonic() < stop_at:
        try:
            await _one_request(client, server, rng, tally)
        except Exception as exc:  # noqa: BLE001 - every failure is reported, not just the first
            tally.failures.append(f"{type(exc).__name__}: {exc}"[:300])


async def _sample_rss(pid: int, stop_at: float, samples: list[tuple[float, int]]) -> None:
    process, started = psutil.Process(pid), time.monotonic()
    while time.monotonic() < stop_at:
        samples.append((time.monotonic() - started, process.memory_info().rss))
        await asyncio.sleep(0.5)
    samples.append((time.monotonic() - started, process.memory_info().rss))


async def _soak(server, api_key: str) -> tuple[Tally, list[tuple[float, int]]]:
    import openai

    client = openai.AsyncOpenAI(
        base_url=f"{server.base_url}/v1", api_key=api_key, max_retries=0, timeout=120,
        http_client=httpx.AsyncClient(limits=httpx.Limits(max_connections=STREAMS + 8)),
    )
    tally, samples = Tally(), []
    stop_at = time.monotonic() + SOAK_S
    async with client:
        await asyncio.gather(
            _sample_rss(server.pid, stop_at, samples),
            *(_stream_loop(client, server, seed, stop_at, tally) for seed in range(STREAMS)),
        )
    return tally, samples


def _idle(http) -> dict:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        health = http.get("/health").json()
        busy = [health[k] for k in ("requests_running", "requests_waiting", "requests_admitted",
                                     "engine_unfinished_requests")]
        if not any(busy):
            return health
        time.sleep(0.1)
    raise AssertionError(f"the server did not go idle after the soak: {health}")


def test_soak_streams_with_n_pins_and_cancellations(server, http):
    aborted_before = http.get("/health").json()["requests_aborted"]
    tally, samples = asyncio.run(_soak(server, server.api_keys[0]))
    health = _idle(http)
    metrics = http.get("/metrics").text
    warm = [rss for t, rss in samples if t >= SOAK_S * WARMUP_FRACTION]
    start_rss, end_rss, peak_rss = warm[0], samples[-1][1], max(warm)
    mib = 1024 * 1024
    print(
        f"\nsoak: {STREAMS} streams for {SOAK_S:.0f} s: {tally.requests} requests finished "
        f"({tally.choices} choices, {tally.tokens} tokens, {tally.pinned} pinned), "
        f"{tally.cancelled} cancelled, {len(tally.failures)} failures; server RSS at the start "
        f"{samples[0][1] / mib:.1f} MiB, after warm-up {start_rss / mib:.1f} MiB, at the end "
        f"{end_rss / mib:.1f} MiB (peak {peak_rss / mib:.1f}); "
        f"aborted engine requests {health['requests_aborted'] - aborted_before}"
    )
    assert not tally.failures, tally.failures[:5]
    assert tally.requests >= STREAMS and tally.cancelled >= 1
    assert health["requests_aborted"] > aborted_before  # the cancellations reached the engine
    assert "gatemix_requests_running 0.0" in metrics and "gatemix_requests_waiting 0.0" in metrics
    assert end_rss - start_rss < RSS_GROWTH_LIMIT, (start_rss, end_rss)
