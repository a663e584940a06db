"""Load against a hub through the public SDK (``AsyncHubClient``): closed loop and open loop.

Closed loop: C callers, each sending its next request the moment its previous one is
answered; that is "C concurrent clients" and finds the throughput at each concurrency.
Open loop: requests arrive on a seeded Poisson schedule at a set rate whatever the hub
is doing, and latency counts from the scheduled arrival, so a slow answer cannot hide
the requests queued behind it (no coordinated omission). That is how "p99 at 80% of peak
throughput" is measured. All callers share one event loop and one client socket, so the
load generator stays light on a 2-core machine.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import Awaitable, Callable, Sequence

import numpy as np

from bench.clips import duration
from bench.stats import Run, Sample
from hub.client import AsyncHubClient, AsyncHubPool

REQUEST_TIMEOUT_S = 300.0
SEED = 7  # the open loop's arrival schedule, so a run can be replayed (bench.mdc)


async def closed_calls(
    call: Callable[[int], Awaitable[Sample]], concurrency: int, jobs: int | None, seconds: float | None
) -> Run:
    """``concurrency`` callers, each awaiting ``call(i)`` for the next request number ``i`` the moment its last
    one was answered, until ``jobs`` requests were sent or ``seconds`` passed: the closed loop of every client
    the benchmarks drive (the SDK, HTTP, a peer's handle)."""
    numbers = itertools.count()
    samples: list[Sample] = []
    started = time.perf_counter()
    stop_at = started + seconds if seconds is not None else float("inf")

    async def caller() -> None:
        for i in numbers:
            if (jobs is not None and i >= jobs) or time.perf_counter() >= stop_at:
                return
            samples.append(await call(i))

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return Run(samples, time.perf_counter() - started)


def timed_calls(call: Callable[[], object], count: int, warm: int) -> list[float]:
    """Seconds each of ``count`` calls took, one at a time, after ``warm`` untimed ones (first calls pay for
    connections and caches)."""
    for _ in range(warm):
        call()
    times = []
    for _ in range(count):
        sent = time.perf_counter()
        call()
        times.append(time.perf_counter() - sent)
    return times


async def _closed(
    endpoint: str | list[str],
    clips: Sequence[np.ndarray],
    provider: str,
    concurrency: int,
    jobs: int | None,
    seconds: float | None,
    use_shm: bool,
) -> Run:
    pooled = isinstance(endpoint, list)  # several hubs: one AsyncHubPool balances over them
    connect = AsyncHubPool if pooled else AsyncHubClient
    async with connect(endpoint, timeout=REQUEST_TIMEOUT_S, use_shm=use_shm) as client:  # type: ignore[operator]
        await client.status()  # the HELLO and shared-memory probe happen before the clock starts

        async def call(i: int) -> Sample:
            pcm = clips[i % len(clips)]
            sent = time.perf_counter()
            transcript = await client.transcribe(pcm, provider)
            done = time.perf_counter()
            return Sample(done - sent, duration(pcm), done, transcript.queue_ms, transcript.inference_ms)

        return await closed_calls(call, concurrency, jobs, seconds)


def closed_loop(
    endpoint: str | list[str],
    clips: Sequence[np.ndarray],
    provider: str,
    concurrency: int,
    jobs: int | None = None,
    seconds: float | None = None,
    use_shm: bool = True,
) -> Run:
    """``concurrency`` callers in a closed loop until ``jobs`` requests were sent or ``seconds`` passed; a list
    of endpoints is served through one ``AsyncHubPool``."""
    return asyncio.run(_closed(endpoint, clips, provider, concurrency, jobs, seconds, use_shm))


def arrivals(rate: float, jobs: int, seed: int) -> list[float]:
    """The seeded Poisson schedule (seconds from the start) an open-loop run uses; ``bench.mdc`` replays it."""
    rng = random.Random(seed)
    return list(itertools.accumulate(rng.expovariate(rate) for _ in range(jobs)))


async def _open(endpoint: str, clips: Sequence[np.ndarray], provider: str, rate: float, jobs: int, seed: int) -> Run:
    async with AsyncHubClient(endpoint, timeout=REQUEST_TIMEOUT_S) as client:
        await client.status()
        samples: list[Sample] = []
        started = time.perf_counter()

        async def request(i: int, at: float) -> None:
            await asyncio.sleep(max(0.0, started + at - time.perf_counter()))
            pcm = clips[i % len(clips)]
            transcript = await client.transcribe(pcm, provider)
            done = time.perf_counter()
            samples.append(
                Sample(done - (started + at), duration(pcm), done, transcript.queue_ms, transcript.inference_ms)
            )

        await asyncio.gather(*(request(i, at) for i, at in enumerate(arrivals(rate, jobs, seed))))
        return Run(samples, time.perf_counter() - started)


def open_loop(
    endpoint: str, clips: Sequence[np.ndarray], provider: str, rate: float, jobs: int, seed: int = SEED
) -> Run:
    """``jobs`` requests arriving as a Poisson process of ``rate`` per second (seeded: reproducible)."""
    return asyncio.run(_open(endpoint, clips, provider, rate, jobs, seed))


def warm_up(endpoint: str | list[str], clips: Sequence[np.ndarray], provider: str, workers: int) -> float:
    """One request per worker, all at once (idle workers are handed jobs LRU first, so each gets one:
    the first inference of a fresh model is slower and must not count); returns when the first answer came."""
    run = closed_loop(endpoint, clips, provider, concurrency=workers, jobs=workers)
    return min(s.done_at for s in run.samples)
