"""``python -m bench.soak --duration SECONDS``: a steady mixed load with periodic worker kills.

Several clients run at once against one supervisor and its gateway: whisper one-shot requests on short
and long clips, whisper segment streams, echo requests, live sessions on echo, and HTTP uploads through
the gateway. Every ``--kill-every`` seconds a random worker is SIGKILLed. Every ``SAMPLE_S`` seconds the
run reads each process's RSS and open descriptors (supervisor, each worker, gateway) and the hub's
shared-memory segments. At the end it reports requests done, errors by code, p99 latency, each lost
request (its kind, request id and the supervisor's log lines for it), and per process the slope of RSS,
descriptors and segments per hour from a line through the lowest reading of each window of about five minutes (the first
``--settle`` seconds left out; ``bench.trend`` says why) with its projection to 24 hours; the readings
themselves are kept in the results file. It passes only with no lost or hung request, an
error rate under 0.1 % (jobs hit by a kill excluded), descriptors and segments back at their baseline,
and each projection within its bound: RSS growth at most 5 % a day, no descriptor and no segment more.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
import wave
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil

from bench import trend
from bench.clips import build_clips
from bench.hubproc import RunningHub, echo_provider, free_port, running_hub, whisper_provider
from hub import shm
from hub.client import HubClient
from hub.errors import HubError
from hub.status import HubStatus

RESULTS = Path(__file__).resolve().parent / "results"
KILLED = "WORKER_CRASHED"  # the error of a job whose worker was killed under it (after its retry)
LOST = ("JOB_TIMEOUT", "HUB_UNREACHABLE")  # no answer within the client's timeout
WARMUP_S = 5.0
SETTLE_S = 3.0
SAMPLE_S = 10.0  # how often every process is read


@dataclass(frozen=True)
class Lost:
    """A request that got no answer within its client's timeout."""

    kind: str
    request_id: str
    code: str
    message: str
    at: float  # seconds into the run


@dataclass
class Tally:
    """Outcomes of every request, shared by the client threads."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    done: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    lost: list[Lost] = field(default_factory=list)
    began: float = field(default_factory=time.perf_counter)

    def run(self, kind: str, call: Callable[[], Any]) -> None:
        started = time.perf_counter()
        try:
            call()
        except HubError as exc:
            with self.lock:
                self.errors[exc.code] += 1
                if exc.code in LOST:
                    self.lost.append(
                        Lost(kind, exc.request_id or "", exc.code, exc.message, round(started - self.began, 1))
                    )
            return
        with self.lock:
            self.done[kind] += 1
            self.latencies.append(time.perf_counter() - started)


def gateway_loop(url: str, tally: Tally, stop: threading.Event) -> None:
    """HTTP uploads of a short WAV through the gateway (the echo provider), so the gateway's own process is
    under load while it is measured."""
    tone = (0.1 * np.sin(np.linspace(0, 2000, 16000))).astype(np.float32)
    wav = _wav(tone)
    with httpx.Client(base_url=url, timeout=60) as http:
        while not stop.is_set():
            tally.run("gateway", lambda: _upload(http, wav))
            time.sleep(0.02)


def _upload(http: httpx.Client, wav: bytes) -> None:
    reply = http.post(
        "/v1/audio/transcriptions", files={"file": ("tone.wav", wav, "audio/wav")}, data={"model": "echo"}
    )
    if reply.status_code != 200:
        error = HubError(f"gateway answered {reply.status_code}: {reply.text[:200]}")
        error.code = str(reply.json().get("error", {}).get("code") or f"HTTP_{reply.status_code}").upper()
        raise error


def _wav(pcm: np.ndarray) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((np.clip(pcm, -1.0, 1.0) * 32767).astype("<i2").tobytes())
    return out.getvalue()


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
        "segments": len(_segments(status)),
    }


def _segments(status: HubStatus) -> list[str]:
    """The hub's shared-memory segments, less those the running gateway keeps for reuse (a client's segment
    pool lives as long as the client: the gateway's, as long as the gateway)."""
    gateway = status.gateway.pid if status.gateway is not None else None
    return [
        n for n in shm.list_segments(shm.hub_prefix(status.hub.id)) if gateway is None or shm.owner_pid(n) != gateway
    ]


@dataclass
class Samples:
    """Every process's readings over the run, as (seconds, value) series by process name and figure."""

    began: float = field(default_factory=time.monotonic)
    series: dict[str, dict[str, list[tuple[float, float]]]] = field(default_factory=dict)

    def add(self, process: str, figure: str, value: float) -> None:
        self.series.setdefault(process, {}).setdefault(figure, []).append((time.monotonic() - self.began, value))

    def read(self, hub: RunningHub) -> None:
        status = hub.status()
        pids = {"supervisor": hub.pid}
        if status.gateway is not None and status.gateway.pid:
            pids["gateway"] = status.gateway.pid
        pids |= {w.id: w.pid for p in status.providers.values() for w in p.workers if w.serving}
        for name, pid in pids.items():
            try:
                proc = psutil.Process(pid)
                rss, fds = proc.memory_info().rss / 2**20, proc.num_fds()
            except psutil.NoSuchProcess:  # a worker killed since the status was read
                continue
            self.add(name, "rss_mb", rss)
            self.add(name, "fds", fds)
        self.add("supervisor", "segments", len(_segments(status)))


def sampler(hub: RunningHub, samples: Samples, stop: threading.Event) -> None:
    while not stop.wait(SAMPLE_S):
        try:
            samples.read(hub)
        except HubError:  # the hub busy past the status timeout: the next reading counts
            continue


MIN_FIT_S = 600.0  # a projection to a day is judged only from at least ten minutes of settled samples


def projections(samples: Samples, settle_s: float) -> dict[str, Any]:
    """Per process: the fitted slopes per hour and the day's verdicts. A process whose settled samples span less
    than ``MIN_FIT_S`` (a worker killed early, or a short run) has its slopes but no verdict, and is named in
    ``short_lived``."""
    out: dict[str, Any] = {"settle_s": settle_s, "processes": {}, "short_lived": []}
    for name, figures in samples.series.items():
        rss = figures.get("rss_mb", [])
        span = rss[-1][0] - rss[0][0] - settle_s if rss else 0.0  # settled from the process's own start
        fits = {figure: trend.fit_floors(points, settle_s) for figure, points in figures.items()}
        if fits.get("rss_mb") is None:
            out["short_lived"].append(name)
            continue
        judged = span >= MIN_FIT_S
        if not judged:
            out["short_lived"].append(name)
        verdicts = trend.day_verdicts(name, fits.get("rss_mb"), fits.get("fds"), fits.get("segments")) if judged else []
        out["processes"][name] = {
            "per_hour": {figure: round(f.per_hour, 4) for figure, f in fits.items() if f is not None},
            "start": {figure: round(f.start, 2) for figure, f in fits.items() if f is not None},
            "verdicts": [{"what": v.what, "figure": v.figure, "ok": v.ok} for v in verdicts],
        }
    return out


def lost_report(tally: Tally, log_path: Path) -> list[dict[str, Any]]:
    """Each lost request: its kind, request id and error, and the supervisor's log lines that name it or its job."""
    log = log_path.read_text(errors="replace").splitlines() if log_path.exists() else []
    report = []
    for lost in tally.lost:
        lines = [line for line in log if lost.request_id and f"request {lost.request_id}" in line]
        jobs = {word for line in lines for word in line.split() if word.startswith(("j", "s")) and word[1:].isdigit()}
        lines += [
            line
            for line in log
            if any(f"job {job}" in line or f"session {job}" in line for job in jobs) and line not in lines
        ]
        report.append({**lost.__dict__, "log": lines[:20]})
    return report


def soak(duration: float, kill_every: float, settle_s: float, workdir: Path) -> dict[str, Any]:
    providers = {
        "whisper": {**whisper_provider(2, 1, "cpu"), "pool": {"min_size": 2, "max_size": 2, "max_queue": 256}},
        "echo": {**echo_provider(2), "pool": {"min_size": 2, "max_size": 2, "max_queue": 1024, "max_sessions": 1}},
    }
    port = free_port()
    gateway = {"enabled": True, "host": "127.0.0.1", "port": port}
    with running_hub(workdir, "soak", providers, gateway=gateway) as hub:
        tally, stop, kills, samples = Tally(), threading.Event(), [], Samples()
        kinds = ["whisper", "whisper", "whisper-stream", "echo", "echo", "session"]
        clients = [
            threading.Thread(target=client_loop, args=(hub, tally, stop, kind, i), daemon=True)
            for i, kind in enumerate(kinds)
        ]
        clients.append(
            threading.Thread(target=gateway_loop, args=(f"http://127.0.0.1:{port}", tally, stop), daemon=True)
        )
        _wait_gateway(port)
        for thread in clients:
            thread.start()
        time.sleep(min(WARMUP_S, duration / 4))
        start = snapshot(hub)
        print(
            f"soak: {len(clients)} clients for {duration:.0f} s, a worker killed every {kill_every:.0f} s", flush=True
        )
        killing = threading.Thread(target=killer, args=(hub, stop, kill_every, kills), daemon=True)
        reading = threading.Thread(target=sampler, args=(hub, samples, stop), daemon=True)
        killing.start()
        reading.start()
        deadline = time.monotonic() + duration
        while time.monotonic() < deadline:
            time.sleep(min(10.0, max(0.0, deadline - time.monotonic())))
            with tally.lock:
                print(f"  {sum(tally.done.values())} done, errors {dict(tally.errors)}, {len(kills)} kills", flush=True)
        stop.set()
        for thread in [*clients, killing, reading]:
            thread.join(90)
        hung = sum(thread.is_alive() for thread in clients)
        time.sleep(SETTLE_S)
        end = snapshot(hub)
        lost = lost_report(tally, hub.log_path)
    report = verdict(tally, kills, hung, start, end, duration, projections(samples, settle_s), lost)
    return report | {"samples": samples.series}


def _wait_gateway(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the gateway on port {port} did not get ready in {timeout:.0f} s")


def verdict(
    tally: Tally,
    kills: list[str],
    hung: int,
    start: dict,
    end: dict,
    duration: float,
    day: dict[str, Any],
    lost: list[dict[str, Any]],
) -> dict[str, Any]:
    done = sum(tally.done.values())
    counted = {code: n for code, n in tally.errors.items() if code != KILLED}
    error_rate = sum(counted.values()) / max(1, done + sum(counted.values()))
    checks = {
        "no request lost or hung": not lost and hung == 0,
        "error rate under 0.1 % (killed jobs excluded)": error_rate < 0.001,
        "file descriptors back at baseline": end["supervisor_fds"] <= start["supervisor_fds"],
        "no shared-memory segment left": end["segments"] == 0,
    }
    for process in day["processes"].values():
        for v in process["verdicts"]:
            checks[f"{v['what']}: {v['figure']}"] = v["ok"]
    latencies = sorted(tally.latencies)
    return {
        "duration_s": duration,
        "requests_done": dict(tally.done),
        "errors": dict(tally.errors),
        "lost": lost,
        "kills": len(kills),
        "hung_clients": hung,
        "error_rate": round(error_rate, 5),
        "p99_latency_s": round(latencies[int(0.99 * (len(latencies) - 1))], 3) if latencies else None,
        "start": start,
        "end": end,
        "day": day,
        "checks": checks,
        "passed": all(checks.values()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load (default 600)")
    parser.add_argument("--kill-every", type=float, default=10.0, help="seconds between worker kills (default 10)")
    parser.add_argument(
        "--settle",
        type=float,
        default=None,
        help="seconds at the start left out of the trend fits (default: a third of the run, at most 600)",
    )
    args = parser.parse_args(argv)
    settle = args.settle if args.settle is not None else min(600.0, args.duration / 3)
    with tempfile.TemporaryDirectory(prefix="asr-hub-soak-") as workdir:
        report = soak(args.duration, args.kill_every, settle, Path(workdir))
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"soak-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=2))
    print(
        json.dumps(
            {k: v for k, v in report.items() if k not in ("start", "end", "day", "lost", "checks", "samples")}, indent=2
        )
    )
    for lost in report["lost"]:
        print(f"LOST {lost['kind']} request {lost['request_id']} at {lost['at']} s: {lost['code']} {lost['message']}")
        for line in lost["log"]:
            print(f"    {line}")
    print(f"per process, fitted after the first {report['day']['settle_s']:.0f} s (slope per hour -> 24 h):")
    for name, process in report["day"]["processes"].items():
        slopes = ", ".join(f"{figure} {value:+.3f}/h" for figure, value in process["per_hour"].items())
        print(f"  {name}: {slopes}")
    if report["day"]["short_lived"]:
        print(f"  not judged (under {MIN_FIT_S:.0f} s of settled samples): {', '.join(report['day']['short_lived'])}")
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
