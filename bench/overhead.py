"""The hub's own cost, with the echo provider (no model): latency added over bare ZeroMQ, echo
requests per second, and shared memory against inline frames as the audio grows.

Latency is measured one request at a time with the blocking ``HubClient``, so it is pure
round-trip cost with no queueing; throughput keeps many requests in flight from one
``AsyncHubClient``. The load generator runs on the same cores as the hub, as any client
on a 2-core machine would, and its CPU share is reported beside the hub's so that it is
clear which process is the bottleneck. CPU microseconds per request of each process
tell where the time goes.
"""

from __future__ import annotations

import bisect
import os
import subprocess
import sys
import time
import timeit
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench import load, zmq_bare
from bench.clips import of_length
from bench.hubproc import RunningHub, echo_provider, free_port, running_hub
from bench.procstats import Meter, wait_for_quiet
from bench.progress import say
from bench.settings import ROOT
from bench.stats import percentiles
from hub.client import HubClient
from hub.supervisor.metrics import BUCKETS, Histogram
from hub.supervisor.sketch import QuantileSketch

NOOP_SAMPLES = 160  # 10 ms of audio: the smallest sensible request
IN_FLIGHT = 32
SHM_SIZES_S = (0.01, 1.0, 30.0, 300.0)


@dataclass(frozen=True)
class OverheadPlan:
    round_trips: int  # sequential requests for each latency figure
    seconds: float  # length of each throughput run
    size_reps: tuple[int, ...]  # requests for each of SHM_SIZES_S
    workers: int  # echo workers
    settle_s: float  # how long each measurement may wait for other processes to leave the machine quiet


@contextmanager
def _bare(*commands: list[str]) -> Iterator[list[int]]:
    """Bare ZeroMQ servers as subprocesses (their pids), killed afterwards (they serve forever)."""
    procs = [subprocess.Popen([sys.executable, "-m", "bench.zmq_bare", *c], cwd=ROOT) for c in commands]
    try:
        time.sleep(0.5)  # let them bind; a DEALER connecting early would only queue its first request
        yield [p.pid for p in procs]
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def _latency(times_s: list[float]) -> dict[str, float]:
    return percentiles([t * 1000 for t in times_s])


def hub_round_trips(endpoint: str, pcm: np.ndarray, count: int, use_shm: bool = True, warm: int = 50) -> list[float]:
    """Seconds per echo request through ``HubClient``, one request at a time."""
    with HubClient(endpoint, timeout=60, use_shm=use_shm) as client:
        return load.timed_calls(lambda: client.transcribe(pcm, "echo"), count, warm)


def _cpu_us(meter: Meter, rps: float) -> dict[str, float]:
    """CPU microseconds each process group spent per request (% of a core ÷ requests per second)."""
    return {name: meter.usage[f"{name}_pct"] * 1e4 / rps for name in meter.groups}  # type: ignore[operator]


def _bare_figures(endpoint: str, groups: dict[str, list[int]], plan: OverheadPlan) -> dict[str, Any]:
    """The same figures for a bare server; ``groups["hub"]`` is whatever stands where the supervisor would."""
    wait_for_quiet(plan.settle_s)
    latency = _latency(zmq_bare.round_trips(endpoint, plan.round_trips))
    with Meter({"client": [os.getpid()], **groups}, settle_s=plan.settle_s) as meter:
        rps = zmq_bare.requests_per_s(endpoint, IN_FLIGHT, plan.seconds)
    return {
        "latency_ms": latency,
        "requests_per_s": rps,
        "usage": meter.usage,
        "cpu_us_per_request": _cpu_us(meter, rps),
    }


def _hub_figures(hub: RunningHub, pcm: np.ndarray, plan: OverheadPlan, use_shm: bool) -> dict[str, Any]:
    """Latency one at a time; then requests per second with IN_FLIGHT outstanding, the latency under
    that load, and who burnt the CPU."""
    wait_for_quiet(plan.settle_s)
    latency = _latency(hub_round_trips(hub.endpoint, pcm, plan.round_trips, use_shm))
    groups = {"client": [os.getpid()], "hub": [hub.pid], "workers": hub.worker_pids("echo")}
    with Meter(groups, settle_s=plan.settle_s) as meter:
        run = load.closed_loop(hub.endpoint, [pcm], "echo", IN_FLIGHT, seconds=plan.seconds, use_shm=use_shm)
    rps = len(run.samples) / run.wall_s
    return {
        "latency_ms": latency,
        "requests_per_s": rps,
        "loaded_latency_ms": _latency([s.latency_s for s in run.samples]),
        "sketch": sketch_figures([s.latency_s for s in run.samples]),
        "usage": meter.usage,
        "cpu_us_per_request": _cpu_us(meter, rps),
    }


class _BucketHistogram:
    """The recording half of the bucket histogram the sketch replaced, as the baseline of its cost."""

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, value)] += 1
        self.count += 1
        self.sum += value


def sketch_figures(latencies_s: list[float]) -> dict[str, float]:
    """The status percentiles' sketch against the exact order statistics of the same latencies, and what one
    observation costs against the bucket histogram it replaced (a bisect over 37 bounds, a count, a sum)."""
    sketch, exact = QuantileSketch(), sorted(latencies_s)
    for value in latencies_s:
        sketch.add(value)
    errors = {}
    for q in (0.5, 0.95, 0.99):
        true = exact[int(q * (len(exact) - 1))]
        errors[f"p{round(q * 100)}"] = abs((sketch.quantile(q) or 0.0) - true) / true
    histogram, bucketed = Histogram(), _BucketHistogram()
    reps = 200_000
    values = [exact[i % len(exact)] for i in range(1000)]
    new = min(timeit.repeat(lambda: [histogram.observe(v) for v in values], number=reps // 1000, repeat=3))
    old = min(timeit.repeat(lambda: [bucketed.observe(v) for v in values], number=reps // 1000, repeat=3))
    return {
        "max_relative_error": max(errors.values()),
        **{f"error_{k}": v for k, v in errors.items()},
        "observe_ns": new / reps * 1e9,
        "bucket_observe_ns": old / reps * 1e9,
    }


def _sizes(hub: RunningHub, clips: list[np.ndarray], reps: tuple[int, ...]) -> list[dict[str, Any]]:
    rows = []
    for seconds, count in zip(SHM_SIZES_S, reps, strict=False):
        pcm = of_length(seconds, clips)
        row: dict[str, Any] = {"audio_s": seconds}
        for mode, use_shm in (("shm", True), ("inline", False)):
            before = hub.status().hub.inline_bytes
            row[mode] = _latency(hub_round_trips(hub.endpoint, pcm, count, use_shm, warm=1))
            row[f"{mode}_bytes_through_hub"] = (hub.status().hub.inline_bytes - before) // (count + 1)
        say(f"  {seconds:g} s of audio: shm p50 {row['shm']['p50']:.2f} ms, inline p50 {row['inline']['p50']:.2f} ms")
        rows.append(row)
    return rows


def measure(workdir: Path, clips: list[np.ndarray], plan: OverheadPlan) -> dict[str, Any]:
    """Every overhead figure: bare one-hop and two-hop ZeroMQ, the hub with and without shared memory."""
    result: dict[str, Any] = {"noop_samples": NOOP_SAMPLES, "in_flight": IN_FLIGHT}
    echo = f"tcp://127.0.0.1:{free_port()}"
    with _bare(["echo", echo]) as pids:
        result["bare_1hop"] = _bare_figures(echo, {"hub": pids}, plan)
    say(
        f"overhead: bare ZeroMQ one hop p50 {result['bare_1hop']['latency_ms']['p50']:.3f} ms, "
        f"{result['bare_1hop']['requests_per_s']:.0f} req/s"
    )
    front, back = f"tcp://127.0.0.1:{free_port()}", f"ipc://{workdir / 'broker.sock'}"
    workers = [["worker", back] for _ in range(plan.workers)]
    with _bare(["broker", front, back], *workers) as pids:
        result["bare_broker"] = _bare_figures(front, {"hub": pids[:1], "workers": pids[1:]}, plan)
    say(
        f"overhead: bare ZeroMQ broker (two hops) p50 {result['bare_broker']['latency_ms']['p50']:.3f} ms, "
        f"{result['bare_broker']['requests_per_s']:.0f} req/s"
    )
    noop = of_length(NOOP_SAMPLES / 16000, clips)
    with running_hub(workdir, "echo", {"echo": echo_provider(plan.workers)}) as hub:
        for mode, use_shm in (("hub_shm", True), ("hub_inline", False)):
            result[mode] = _hub_figures(hub, noop, plan, use_shm)
            say(
                f"overhead: hub echo ({mode[4:]}) p50 {result[mode]['latency_ms']['p50']:.3f} ms, "
                f"{result[mode]['requests_per_s']:.0f} req/s"
            )
        say("shared memory against inline frames:")
        result["sizes"] = _sizes(hub, clips, plan.size_reps)
    return result
