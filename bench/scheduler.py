"""The scheduler alone: many live sessions at the speed of speech over a few echo workers.

Every session sends a 50 ms chunk every 50 ms on its own real-time schedule (the sessions' starts
spread over one ``step_ms``, as real microphones are not in step), through the SDK's shared-memory
ring. The echo workers decode almost for free, so what is measured is the hub's own work: the
supervisor forwarding chunks and events, the workers taking turns. A partial covers the audio up to
its ``heard`` mark; its **chunk-to-partial** latency is the time from sending the last chunk it covers
to receiving it: what the hub adds between the audio that made a session due and the text. Each
session's p99 of that is reported (their median and the worst), with the supervisor's CPU over the run.

The sessions run in a few client processes (asyncio, one ``AsyncHubClient`` each). How late the clients
themselves sent their chunks is reported too: on a loaded machine a late sender, not the hub, can be
what delays a partial.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import queue
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.hubproc import running_hub
from bench.procstats import Meter, wait_for_quiet
from bench.progress import say
from hub.client import AsyncHubClient

CHUNK_S = 0.05
STEP_MS = 1000
SAMPLES = int(CHUNK_S * 16000)


@dataclass(frozen=True)
class SchedulerPlan:
    sessions: int = 200
    workers: int = 4
    seconds: float = 20.0  # audio each session sends
    clients: int = 4  # client processes the sessions are spread over
    settle_s: float = 30.0


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _one(client: AsyncHubClient, begin: float, seconds: float) -> tuple[list[float], list[float]]:
    """One session: its chunk-to-partial latencies and how late each chunk left (seconds)."""
    chunk = (np.sin(np.arange(SAMPLES) / 7.0) * 0.1).astype(np.float32)
    sent_at: list[float] = []  # when chunk k (covering audio up to (k + 1) * CHUNK_S) was sent
    late: list[float] = []
    latencies: list[float] = []
    session = await client.open_stream("echo", timeout=120)

    async def read() -> None:
        async for event in session.results():
            if event.kind != "partial" or event.heard <= 0:
                continue
            now = time.monotonic()
            last = int(round(event.heard / CHUNK_S)) - 1  # the newest chunk the partial covers
            if 0 <= last < len(sent_at):
                latencies.append(now - sent_at[last])

    reader = asyncio.create_task(read())
    await asyncio.sleep(max(0.0, begin - time.monotonic()))
    for k in range(int(seconds / CHUNK_S)):
        due = begin + k * CHUNK_S
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        late.append(time.monotonic() - due)
        sent_at.append(time.monotonic())
        await session.send(chunk)
    await session.close()
    await reader
    return latencies, late


async def _sessions(endpoint: str, count: int, first: int, total: int, begin: float, seconds: float) -> list[Any]:
    async with AsyncHubClient(endpoint, timeout=120) as client:
        # the global index spreads every session's start over one step, whichever process runs it
        jobs = [_one(client, begin + (first + i) / total * STEP_MS / 1000, seconds) for i in range(count)]
        return list(await asyncio.gather(*jobs))


def _client(endpoint: str, count: int, first: int, total: int, begin: float, seconds: float, out: Any) -> None:
    """A client process: ``count`` sessions from ``begin`` (the monotonic clock, which every process on the
    host shares); the results go back through ``out`` (a queue)."""
    out.put(asyncio.run(_sessions(endpoint, count, first, total, begin, seconds)))


def measure(workdir: Path, plan: SchedulerPlan) -> dict[str, Any]:
    per_worker = -(-plan.sessions // plan.workers)
    provider = {
        "type": "echo",
        # a short window keeps the echo decodes (and the window copies) cheap: the hub is what is measured
        "stream": {"step_ms": STEP_MS, "window_seconds": 2.0},
        "pool": {
            "enabled": True,
            "min_size": plan.workers,
            "max_size": plan.workers,
            "sessions_per_worker": per_worker,
            "max_queue": 1024,
            "acquire_timeout": 120,
            "session_idle_timeout": 120,
        },
    }
    ctx = multiprocessing.get_context("spawn")
    with running_hub(workdir, "scheduler", {"echo": provider}) as hub:
        wait_for_quiet(plan.settle_s)
        out = ctx.Queue()
        shares = [len(part) for part in np.array_split(np.arange(plan.sessions), plan.clients)]
        firsts = np.cumsum([0, *shares[:-1]])
        begin = time.monotonic() + 5.0 + plan.sessions * 0.02  # time to start the clients and open every session
        procs = [
            ctx.Process(target=_client, args=(hub.endpoint, n, int(f), plan.sessions, begin, plan.seconds, out))
            for n, f in zip(shares, firsts, strict=False)
        ]
        for proc in procs:
            proc.start()
        groups = {"clients": [p.pid for p in procs if p.pid], "hub": [hub.pid], "workers": hub.worker_pids("echo")}
        time.sleep(max(0.0, begin + STEP_MS / 1000 - time.monotonic()))  # the steady stream, not the opening
        with Meter(groups) as meter:
            time.sleep(max(1.0, plan.seconds - 2.0))
        results = _collect(procs, out, time.monotonic() + plan.seconds + 120)
    per_session = [_percentile(latencies, 0.99) * 1000 for latencies, _ in results if latencies]
    late = [x * 1000 for _, lateness in results for x in lateness]
    figures = {
        "sessions": plan.sessions,
        "workers": plan.workers,
        "chunk_s": CHUNK_S,
        "step_ms": STEP_MS,
        "seconds": plan.seconds,
        "partials": sum(len(latencies) for latencies, _ in results),
        "sessions_with_partials": len(per_session),
        "session_p99_ms": {
            "median": _percentile(per_session, 0.5) if per_session else None,
            "worst": max(per_session) if per_session else None,
        },
        "all_partials_ms": _summary([x * 1000 for latencies, _ in results for x in latencies]),
        "client_late_ms": _summary(late),
        "hub_cpu_pct": meter.usage["hub_pct"],
        "usage": meter.usage,
    }
    say(
        f"scheduler: {plan.sessions} echo sessions on {plan.workers} workers, chunk-to-partial p99 per session: "
        f"median {figures['session_p99_ms']['median']:.0f} ms, worst {figures['session_p99_ms']['worst']:.0f} ms; "
        f"supervisor {meter.usage['hub_pct']:.0f} % of a core"
    )
    return figures


def _collect(procs: list[Any], out: Any, deadline: float) -> list[tuple[list[float], list[float]]]:
    """Every client process's sessions; a client that died or overran is an error, not a silent gap."""
    results: list[tuple[list[float], list[float]]] = []
    waiting = len(procs)
    while waiting:
        try:
            results += out.get(timeout=1.0)
            waiting -= 1
        except queue.Empty:
            failed = [p for p in procs if p.exitcode not in (None, 0)]
            if failed or time.monotonic() > deadline:
                for proc in procs:
                    proc.kill()
                raise RuntimeError(
                    f"scheduler bench: client process(es) {[p.pid for p in failed]} failed or overran"
                ) from None
    for proc in procs:
        proc.join(30)
    return results


def _summary(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None, "max": None}
    return {"p50": _percentile(values, 0.5), "p99": _percentile(values, 0.99), "max": max(values)}
