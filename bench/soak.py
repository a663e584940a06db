"""``python -m bench.soak --duration SECONDS``: a steady mixed load with periodic worker kills.

Several clients run at once against one supervisor: whisper one-shot requests on short
and long clips, whisper segment streams, echo requests, and live sessions on echo. Every
``--kill-every`` seconds a random worker is SIGKILLed. At the end the run reports
requests done, errors by code, p99 latency, supervisor and worker memory at start and
end, open file descriptors and shared-memory segments, and passes only with no lost or
hung request, an error rate under 0.1 % (jobs hit by a kill excluded), the supervisor's
memory grown by under 10 %, and descriptors and segments back at their baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from bench.clips import build_clips
from bench.hubproc import RunningHub, echo_provider, running_hub, whisper_provider
from hub import shm
from hub.client import HubClient
from hub.errors import HubError

RESULTS = Path(__file__).resolve().parent / "results"
KILLED = "WORKER_CRASHED"  # the error of a job whose worker was killed under it (after its retry)
LOST = ("JOB_TIMEOUT", "HUB_UNREACHABLE")  # no answer within the client's timeout
WARMUP_S = 5.0
SETTLE_S = 3.0


@dataclass
class Tally:
    """Outcomes of every request, shared by the client threads."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    done: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)

    def run(self, kind: str, call: Callable[[], Any]) -> None:
        started = time.perf_counter()
        try:
            call()
        except HubError as exc:
            with self.lock:
                self.errors[exc.code] += 1
            return
        with self.lock:
            self.done[kind] += 1
            self.latencies.append(time.perf_counter() - started)


def client_loop(hub: RunningHub, tally: Tally, stop: threading.Event, kind: str, seed: int) -> None:
    rng = random.Random(seed)
    clips = build_clips()
    long_clip = np.concatenate(clips)
    tone = (0.1 * np.sin(np.linspace(0, 2000, 16000))).astype(np.float32)
    steps = np.concatenate([np.full(8000, 0.01 * (i + 1), dtype=np.float32) for i in range(6)])
    with HubClient(hub.endpoint, timeout=60) as client:
        while not stop.is_set():
            if kind == "whisper":
                audio = long_clip if rng.random() < 0.25 else rng.choice(clips)
                tally.run("whisper", lambda audio=audio: client.transcribe(audio, "whisper"))
            elif kind == "whisper-stream":
                audio = rng.choice(clips)
                tally.run("whisper-stream", lambda audio=audio: list(client.transcribe_stream(audio, "whisper")))
            elif kind == "echo":
                tally.run("echo", lambda: client.transcribe(tone[: rng.randint(1600, 16000)], "echo"))
                time.sleep(0.01)
            else:
                tally.run("session", lambda: _session(client, steps))


def _session(client: HubClient, pcm: np.ndarray) -> None:
    with client.open_stream("echo") as session:
        for start in range(0, pcm.size, 1600):
            session.send(pcm[start : start + 1600])
            time.sleep(0.02)


def killer(hub: RunningHub, stop: threading.Event, every: float, kills: list[str]) -> None:
    rng = random.Random(99)
    while not stop.wait(every):
        providers = hub.status().providers
        live = [(p, w) for p, info in providers.items() for w in info.workers if w.serving]
        if live:
            provider, worker = rng.choice(live)
            os.kill(worker.pid, signal.SIGKILL)
            kills.append(worker.id)


def snapshot(hub: RunningHub) -> dict[str, Any]:
    supervisor = psutil.Process(hub.pid)
    status = hub.status()
    workers = {w.id: round(w.rss_mb, 1) for p in status.providers.values() for w in p.workers}
    return {
        "supervisor_rss_mb": round(supervisor.memory_info().rss / 2**20, 1),
        "supervisor_fds": supervisor.num_fds(),
        "worker_rss_mb": workers,
        "segments": len(shm.list_segments(shm.hub_prefix(status.hub.id))),
    }


def soak(duration: float, kill_every: float, workdir: Path) -> dict[str, Any]:
    providers = {
        "whisper": {**whisper_provider(2, 1, "cpu"), "pool": {"min_size": 2, "max_size": 2, "max_queue": 256}},
        "echo": {**echo_provider(2), "pool": {"min_size": 2, "max_size": 2, "max_queue": 1024, "max_sessions": 1}},
    }
    with running_hub(workdir, "soak", providers) as hub:
        tally, stop, kills = Tally(), threading.Event(), []
        kinds = ["whisper", "whisper", "whisper-stream", "echo", "echo", "session"]
        clients = [
            threading.Thread(target=client_loop, args=(hub, tally, stop, kind, i), daemon=True)
            for i, kind in enumerate(kinds)
        ]
        for thread in clients:
            thread.start()
        time.sleep(min(WARMUP_S, duration / 4))
        start = snapshot(hub)
        print(
            f"soak: {len(clients)} clients for {duration:.0f} s, a worker killed every {kill_every:.0f} s", flush=True
        )
        killing = threading.Thread(target=killer, args=(hub, stop, kill_every, kills), daemon=True)
        killing.start()
        deadline = time.monotonic() + duration
        while time.monotonic() < deadline:
            time.sleep(min(10.0, max(0.0, deadline - time.monotonic())))
            with tally.lock:
                print(f"  {sum(tally.done.values())} done, errors {dict(tally.errors)}, {len(kills)} kills", flush=True)
        stop.set()
        for thread in [*clients, killing]:
            thread.join(90)
        hung = sum(thread.is_alive() for thread in clients)
        time.sleep(SETTLE_S)
        end = snapshot(hub)
    return verdict(tally, kills, hung, start, end, duration)


def verdict(tally: Tally, kills: list[str], hung: int, start: dict, end: dict, duration: float) -> dict[str, Any]:
    done = sum(tally.done.values())
    lost = sum(tally.errors[code] for code in LOST)
    counted = {code: n for code, n in tally.errors.items() if code != KILLED}
    error_rate = sum(counted.values()) / max(1, done + sum(counted.values()))
    growth = end["supervisor_rss_mb"] / start["supervisor_rss_mb"] - 1
    checks = {
        "no request lost or hung": lost == 0 and hung == 0,
        "error rate under 0.1 % (killed jobs excluded)": error_rate < 0.001,
        "supervisor RSS grew under 10 %": growth < 0.10,
        "file descriptors back at baseline": end["supervisor_fds"] <= start["supervisor_fds"],
        "no shared-memory segment left": end["segments"] == 0,
    }
    latencies = sorted(tally.latencies)
    return {
        "duration_s": duration,
        "requests_done": dict(tally.done),
        "errors": dict(tally.errors),
        "kills": len(kills),
        "hung_clients": hung,
        "error_rate": round(error_rate, 5),
        "p99_latency_s": round(latencies[int(0.99 * (len(latencies) - 1))], 3) if latencies else None,
        "start": start,
        "end": end,
        "supervisor_rss_growth": round(growth, 4),
        "checks": checks,
        "passed": all(checks.values()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load (default 600)")
    parser.add_argument("--kill-every", type=float, default=10.0, help="seconds between worker kills (default 10)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="asr-hub-soak-") as workdir:
        report = soak(args.duration, args.kill_every, Path(workdir))
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"soak-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k not in ("start", "end")}, indent=2))
    print(
        f"supervisor RSS {report['start']['supervisor_rss_mb']} -> {report['end']['supervisor_rss_mb']} MiB, "
        f"fds {report['start']['supervisor_fds']} -> {report['end']['supervisor_fds']}, "
        f"segments left {report['end']['segments']}"
    )
    for check, ok in report["checks"].items():
        print(f"  {'PASS' if ok else 'FAIL'}  {check}")
    print(f"written to {path}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
