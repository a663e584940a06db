"""The supervisor's loop under live sessions: 50 ms chunks from many sessions, echo workers.

Each session runs in its own client process (the SDK's ``StreamSession`` through a
shared-memory ring, so a chunk crosses the supervisor as a small ``STREAM_DATA``
descriptor), sending chunks as fast as the ring's back-pressure allows. The figure is
chunks forwarded per second, with the CPU the supervisor spent per chunk: on 2 cores the
client processes share the machine with the hub, so the supervisor's own capacity
(one core ÷ its CPU per chunk) is reported beside the rate reached.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.hubproc import running_hub
from bench.procstats import Meter, wait_for_quiet
from bench.progress import say
from hub.client import HubClient
from hub.status import PoolStatus

CHUNK_S = 0.05


def _session(endpoint: str, seconds: float, start: Any, counts: Any, index: int) -> None:
    chunk = (np.sin(np.arange(int(CHUNK_S * 16000)) / 7.0) * 0.1).astype(np.float32)
    with HubClient(endpoint, timeout=60) as client, client.open_stream("echo", timeout=60) as session:
        start.wait()
        stop_at = time.monotonic() + seconds
        sent = 0
        while time.monotonic() < stop_at:
            session.send(chunk)
            sent += 1
        counts[index] = sent


def measure(workdir: Path, sessions: int, seconds: float, settle_s: float) -> dict[str, Any]:
    # a decode every 5 s of audio over a 10 s window: the echo workers stay cheap, so the chunks measure the loop
    provider = {
        "type": "echo",
        "stream": {"step_ms": 5000, "window_seconds": 10.0},
        "pool": {
            "enabled": True,
            "min_size": sessions,
            "max_size": sessions + 1,
            "max_sessions": sessions,
            "session_idle_timeout": 60,
        },
    }
    ctx = multiprocessing.get_context("spawn")
    with running_hub(workdir, "chunks", {"echo": provider}) as hub:
        start, counts = ctx.Event(), ctx.Array("q", sessions)
        procs = [ctx.Process(target=_session, args=(hub.endpoint, seconds, start, counts, i)) for i in range(sessions)]
        for proc in procs:
            proc.start()
        deadline = time.monotonic() + 60
        while (hub.status().providers["echo"].pool or PoolStatus()).sessions < sessions and time.monotonic() < deadline:
            time.sleep(0.1)
        wait_for_quiet(settle_s)
        groups = {"client": [p.pid for p in procs if p.pid], "hub": [hub.pid], "workers": hub.worker_pids("echo")}
        with Meter(groups, settle_s=0) as meter:
            start.set()
            time.sleep(seconds)
        for proc in procs:
            proc.join(60)
        total = sum(counts)
    rate = total / seconds
    hub_us = meter.usage["hub_pct"] * 1e4 / rate if rate else float("nan")
    result = {
        "sessions": sessions,
        "chunk_s": CHUNK_S,
        "chunks": total,
        "chunks_per_s": rate,
        "hub_cpu_us_per_chunk": hub_us,
        "hub_capacity_chunks_per_s": 1e6 / hub_us if hub_us else float("nan"),
        "usage": meter.usage,
        "pid": os.getpid(),
    }
    say(
        f"live sessions: {sessions} × 50 ms chunks, {rate:.0f} chunks/s forwarded; supervisor {hub_us:.0f} µs "
        f"of CPU per chunk ({meter.usage['hub_pct']:.0f} % of a core), "
        f"so one core would forward {result['hub_capacity_chunks_per_s']:.0f}/s"
    )
    return result
