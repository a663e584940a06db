"""Balancing over hubs: two hubs of one worker behind one ``HubPool`` against one hub of two workers.

Both serve the same clips at the same concurrency with whisper tiny.en, one after the other, so
they never compete for the cores. The figures are the throughput ratio (pool of hubs / one hub;
target ≥ 0.97: spreading requests over pods must cost next to nothing) and the latency a
request gains by going through the pool (echo no-op round trips, p50, pool against one client).
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench import load
from bench.hubproc import echo_provider, running_hub, whisper_provider
from bench.procstats import wait_for_quiet
from bench.progress import say
from bench.stats import percentiles
from hub.client import HubClient, HubPool

CONCURRENCY = 4
HUBS = 2


@dataclass(frozen=True)
class PoolPlan:
    jobs: int  # whisper clips per throughput run
    round_trips: int  # sequential echo requests for each latency figure
    settle_s: float


def _round_trips(client: HubClient | HubPool, pcm: np.ndarray, count: int) -> list[float]:
    times = []
    for _ in range(count + 20):  # the first twenty warm up both paths
        sent = time.perf_counter()
        client.transcribe(pcm, "echo")
        times.append(time.perf_counter() - sent)
    return [t * 1000 for t in times[20:]]


def _audio_per_s(endpoints: str | list[str], clips: list[np.ndarray], jobs: int, settle_s: float) -> float:
    load.warm_up(endpoints, clips, "whisper", HUBS)
    wait_for_quiet(settle_s)
    run = load.closed_loop(endpoints, clips, "whisper", CONCURRENCY, jobs=jobs)
    return sum(s.audio_s for s in run.samples) / run.wall_s


def measure(workdir: Path, clips: list[np.ndarray], plan: PoolPlan) -> dict[str, Any]:
    with running_hub(workdir, "one-hub-2", {"whisper": whisper_provider(HUBS, 1, "cpu")}) as hub:
        single = _audio_per_s(hub.endpoint, clips, plan.jobs, plan.settle_s)
    with ExitStack() as stack:
        hubs = [
            stack.enter_context(running_hub(workdir, f"pooled-hub-{i}", {"whisper": whisper_provider(1, 1, "cpu")}))
            for i in range(HUBS)
        ]
        pooled = _audio_per_s([h.endpoint for h in hubs], clips, plan.jobs, plan.settle_s)
    noop = np.resize(clips[0], 160)  # 10 ms, as in the overhead figures
    with ExitStack() as stack:
        hubs = [
            stack.enter_context(running_hub(workdir, f"echo-hub-{i}", {"echo": echo_provider(1)})) for i in range(HUBS)
        ]
        wait_for_quiet(plan.settle_s)
        with HubClient(hubs[0].endpoint, timeout=60) as client:
            direct = percentiles(_round_trips(client, noop, plan.round_trips))
        with HubPool([h.endpoint for h in hubs], timeout=60) as pool:
            through_pool = percentiles(_round_trips(pool, noop, plan.round_trips))
    result = {
        "hubs": HUBS,
        "concurrency": CONCURRENCY,
        "audio_per_s": {"one_hub": single, "hub_pool": pooled},
        "pool_vs_one_hub": pooled / single,
        "echo_latency_ms": {"client": direct, "pool": through_pool, "added_p50": through_pool["p50"] - direct["p50"]},
    }
    say(
        f"hub pool: {HUBS} hubs of 1 worker {pooled:.1f} audio s/s against one hub of {HUBS} workers {single:.1f} "
        f"({result['pool_vs_one_hub']:.1%}); a request through the pool +{result['echo_latency_ms']['added_p50']:.2f} ms p50"
    )
    return result
