"""``python -m bench.peers [--quick]`` (``make bench-peers``): Ray Serve beside the hub, the same work in one run.

It runs in ``.venv-peers`` (the project plus ``ray[serve]``: the project itself never imports Ray). Both sides
get the same clips (``bench.clips``) and the same model processes: tiny.en int8 on one thread in each of two
processes that take one request at a time (the hub: a pool of two workers with ``cpu_threads: 1``; Ray: two
replicas of one CPU with ``max_ongoing_requests=1``), with the hub workers' thread environment. Each side
is driven through its in-process API (the SDK; a ``DeploymentHandle``) and over HTTP (the gateway's OpenAI
route; Serve's HTTP proxy, on loopback, at the same route), whisper at C=4 and a no-op (the echo provider; a
deployment that does nothing) one request at a time and with 32 in flight. The fair ceiling is
``bench.bare``'s: two bare 1-thread processes fed from one shared queue. One side at a time has the
machine; Ray goes last and is always removed (``bench.rayproc``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from bench import gateway, load, peer_report
from bench.bare import run_bare, save_clips
from bench.clips import build_clips, duration, of_length
from bench.hubproc import echo_provider, free_port, running_hub, whisper_provider
from bench.matrix import least_disturbed
from bench.overhead import IN_FLIGHT, NOOP_SAMPLES, hub_round_trips
from bench.procstats import Meter, describe_machine, process_tree, resident_mb
from bench.progress import elapsed, say
from bench.rayproc import REPLICAS, RaySide
from bench.stats import Cell, Run, percentiles

RESULTS = Path(__file__).resolve().parent / "results"
CONCURRENCY = 4  # whisper callers: two waiting behind each of the two model processes
# The overhead bench's 32, and one per model process: Serve's router backs off while every replica is busy,
# so with max_ongoing_requests=1 its rate falls as more requests wait; the smaller level shows the cost of a
# request without that.
IN_FLIGHT_LEVELS = (REPLICAS, IN_FLIGHT)
GATEWAY = "/readyz"
Groups = Callable[[], dict[str, list[int]]]


@dataclass(frozen=True)
class PeerPlan:
    jobs: int  # whisper requests per throughput run (and for the ceiling)
    round_trips: int  # no-op requests one at a time
    seconds: float  # each loaded no-op run
    settle_s: float  # how long each measurement may wait for the machine to be quiet
    retries: int  # how often the ceiling is measured again while other processes disturbed it (as in bench.matrix)


def _whisper_cell(label: str, take: Callable[[], Run], groups: Groups, plan: PeerPlan) -> dict[str, Any]:
    with Meter(groups(), settle_s=plan.settle_s) as meter:
        run = take()
    cell = Cell.of(label, REPLICAS, 1, CONCURRENCY, run)
    cell.usage = meter.usage
    say(f"{label}: {cell.audio_per_s:.1f} audio s/s, p50 {cell.latency_ms['p50']:.0f} ms")
    return cell.to_dict()


def _noop(
    label: str, round_trips: Callable[[], list[float]], loaded: Callable[[int], Run], groups: Groups, plan: PeerPlan
) -> dict[str, Any]:
    """The no-op one request at a time, then with each of IN_FLIGHT_LEVELS outstanding."""
    with Meter(groups(), settle_s=plan.settle_s) as quiet:
        latency = percentiles([t * 1000 for t in round_trips()])
    figures: dict[str, Any] = {"latency": {"latency_ms": latency, "usage": quiet.usage}, "load": {}}
    for in_flight in IN_FLIGHT_LEVELS:
        with Meter(groups(), settle_s=plan.settle_s) as busy:
            run = loaded(in_flight)
        figures["load"][str(in_flight)] = {
            "requests_per_s": run.requests_per_s,
            "latency_ms": percentiles([s.latency_s * 1000 for s in run.samples]),
            "usage": busy.usage,
        }
    rates = ", ".join(
        f"{figures['load'][str(n)]['requests_per_s']:.0f} req/s with {n} in flight" for n in IN_FLIGHT_LEVELS
    )
    say(f"{label}: no-op p50 {latency['p50']:.2f} ms; {rates}")
    return figures


def measure_hub(workdir: Path, clips: list[np.ndarray], plan: PeerPlan) -> dict[str, Any]:
    """The hub's figures: a pool of two 1-thread whisper workers, then two echo workers, each with its gateway."""
    uploads = [gateway.wav_bytes(c) for c in clips]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    providers = {"whisper": whisper_provider(REPLICAS, 1, "cpu")}
    with running_hub(workdir, "peers-whisper", providers, gateway={"enabled": True, "port": port}) as hub:
        first_answer = load.warm_up(hub.endpoint, clips, "whisper", REPLICAS) - hub.started_at
        say(f"hub: first answer {first_answer:.1f} s after the supervisor started")
        gateway.wait_ready(url, GATEWAY)
        groups = lambda: {"client": [os.getpid()], "server": process_tree(hub.pid)}  # noqa: E731
        whisper = {
            "client": _whisper_cell(
                "hub, SDK",
                lambda: load.closed_loop(hub.endpoint, clips, "whisper", CONCURRENCY, jobs=plan.jobs),
                groups,
                plan,
            ),
            "http": _whisper_cell(
                "hub, HTTP",
                lambda: asyncio.run(gateway.http_closed(url, uploads, "whisper", CONCURRENCY, plan.jobs, None)),
                groups,
                plan,
            ),
        }
        server = process_tree(hub.pid)
        side = {
            "first_answer_s": first_answer,
            "rss_mb": resident_mb(server),
            "processes": len(server),
            "whisper": whisper,
        }
    noop = of_length(NOOP_SAMPLES / 16000, clips)
    upload = gateway.wav_bytes(noop)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with running_hub(
        workdir, "peers-echo", {"echo": echo_provider(REPLICAS)}, gateway={"enabled": True, "port": port}
    ) as hub:
        gateway.wait_ready(url, GATEWAY)
        groups = lambda: {"client": [os.getpid()], "server": process_tree(hub.pid)}  # noqa: E731
        side["echo"] = {
            "client": _noop(
                "hub, SDK",
                lambda: hub_round_trips(hub.endpoint, noop, plan.round_trips),
                lambda n: load.closed_loop(hub.endpoint, [noop], "echo", n, seconds=plan.seconds),
                groups,
                plan,
            ),
            "http": _noop(
                "hub, HTTP",
                lambda: gateway.http_round_trips(url, upload, plan.round_trips),
                lambda n: asyncio.run(gateway.http_closed(url, [upload], "echo", n, None, plan.seconds)),
                groups,
                plan,
            ),
        }
    return side


def measure_ray(workdir: Path, clips: list[np.ndarray], plan: PeerPlan) -> dict[str, Any]:
    """Ray Serve's figures: the whisper application, then the no-op one, in one Ray cluster."""
    uploads = [gateway.wav_bytes(c) for c in clips]
    upload = gateway.wav_bytes(of_length(NOOP_SAMPLES / 16000, clips))
    with RaySide(workdir, free_port()) as ray:
        say("Ray Serve: starting Ray, Serve and the whisper application")
        first_answer = ray.ask("deploy", kind="whisper")["first_answer_at"] - ray.started_at
        say(f"Ray Serve: first answer {first_answer:.1f} s after the process started")
        gateway.wait_ready(ray.url, "/-/routes", gateway.ROUTE)
        groups = lambda: {"client": [os.getpid(), ray.pid], "server": ray.server_pids()}  # noqa: E731

        def handle_run(audio: str, concurrency: int, jobs: int | None, seconds: float | None) -> Run:
            return Run.from_dict(ray.ask("closed", audio=audio, concurrency=concurrency, jobs=jobs, seconds=seconds))

        whisper = {
            "client": _whisper_cell(
                "Ray Serve, handle", lambda: handle_run("speech", CONCURRENCY, plan.jobs, None), groups, plan
            ),
            "http": _whisper_cell(
                "Ray Serve, HTTP",
                lambda: asyncio.run(gateway.http_closed(ray.url, uploads, "whisper", CONCURRENCY, plan.jobs, None)),
                groups,
                plan,
            ),
        }
        server = ray.server_pids()
        side = {
            "first_answer_s": first_answer,
            "rss_mb": resident_mb(server),
            "processes": len(server),
            "whisper": whisper,
        }
        ray.ask("deploy", kind="echo")
        gateway.wait_ready(ray.url, "/-/routes", gateway.ROUTE)
        side["echo"] = {
            "client": _noop(
                "Ray Serve, handle",
                lambda: ray.ask("round_trips", count=plan.round_trips, warm=50),
                lambda n: handle_run("noop", n, None, plan.seconds),
                groups,
                plan,
            ),
            "http": _noop(
                "Ray Serve, HTTP",
                lambda: gateway.http_round_trips(ray.url, upload, plan.round_trips),
                lambda n: asyncio.run(gateway.http_closed(ray.url, [upload], "echo", n, None, plan.seconds)),
                groups,
                plan,
            ),
        }
    say("Ray Serve: stopped, every process it started is gone")
    return side


def _interrupt(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through every `with`, which stops the hubs and removes Ray


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer requests, and at most 2 s waiting for quiet")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the JSON goes")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    if args.quick:
        plan = PeerPlan(jobs=8, round_trips=300, seconds=2, settle_s=2, retries=0)
    else:
        plan = PeerPlan(jobs=24, round_trips=1000, seconds=5, settle_s=30, retries=1)
    clips = build_clips()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    result: dict[str, Any] = {
        "concurrency": CONCURRENCY,
        "in_flight": list(IN_FLIGHT_LEVELS),
        "replicas": REPLICAS,
        "clips": [duration(c) for c in clips],
    }
    with tempfile.TemporaryDirectory(prefix="asr-peers-") as tmp:
        workdir = Path(tmp)
        save_clips(clips, workdir / "clips.npz")
        say(f"fair ceiling: {REPLICAS} bare processes × 1 thread from a shared queue, {plan.jobs} clips")
        take = partial(
            run_bare,
            "ceiling",
            clips,
            workdir / "clips.npz",
            REPLICAS,
            1,
            "cpu",
            plan.jobs,
            workdir / "bare.log",
            plan.settle_s,
        )
        result["ceiling"] = least_disturbed(plan.retries, take).to_dict()
        result["hub"] = measure_hub(workdir, clips, plan)
        result["ray"] = measure_ray(workdir, clips, plan)
    result["meta"] = {
        "timestamp": stamp,
        "quick": args.quick,
        "ray_version": metadata.version("ray"),
        "machine": describe_machine(),
        "plan": vars(plan),
        "duration_s": elapsed(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"peers-{stamp}.json"
    path.write_text(json.dumps(result, indent=1, default=str))
    print(peer_report.format_table(result))
    say(f"done in {elapsed():.0f} s: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
