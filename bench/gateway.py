"""The gateway's cost: HTTP (the OpenAI-compatible API) against the SDK, on the same hub in one run.

- echo, one request at a time: p50 latency through HTTP and through the SDK; the difference is what
  the gateway adds (multipart parsing, decoding the WAV upload, one more hop);
- echo requests per second over HTTP with many in flight, beside the SDK's;
- whisper (tiny.en) throughput at C=4 through HTTP as a share of the SDK's on the same clips: the
  gateway must not be the bottleneck (target ≥ 0.97).

The HTTP load generator (httpx) runs on the same cores, as the SDK's does.
"""

from __future__ import annotations

import asyncio
import io
import time
import urllib.request
import wave
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench import load
from contextlib import AbstractContextManager

from bench.hubproc import RunningHub, echo_provider, free_port, running_hub, whisper_provider
from bench.procstats import wait_for_quiet
from bench.progress import say
from bench.stats import percentiles
from hub.client import HubClient

IN_FLIGHT = 32
WHISPER_CONCURRENCY = 4
READY_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class GatewayPlan:
    round_trips: int  # sequential echo requests for each latency figure
    seconds: float  # length of each echo throughput run
    whisper_jobs: int  # clips for each whisper throughput run
    whisper_workers: int
    settle_s: float


def wav_bytes(pcm: np.ndarray) -> bytes:
    """16-bit mono 16 kHz WAV, as a client would upload it."""
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((np.clip(pcm, -1, 1) * 32767).astype("<i2").tobytes())
    return out.getvalue()


def _wait_ready(url: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"the gateway at {url} did not get ready")


def _sdk_round_trips(endpoint: str, pcm: np.ndarray, count: int) -> list[float]:
    with HubClient(endpoint, timeout=60) as client:
        times = []
        for _ in range(count + 20):
            sent = time.perf_counter()
            client.transcribe(pcm, "echo")
            times.append(time.perf_counter() - sent)
        return times[20:]


def _http_round_trips(url: str, upload: bytes, count: int) -> list[float]:
    with httpx.Client(base_url=url, timeout=60) as client:
        times = []
        for _ in range(count + 20):
            sent = time.perf_counter()
            reply = client.post("/v1/audio/transcriptions", files={"file": ("a.wav", upload)}, data={"model": "echo"})
            reply.raise_for_status()
            times.append(time.perf_counter() - sent)
        return times[20:]


async def _http_closed(url: str, uploads: Sequence[bytes], model: str, concurrency: int, jobs: int | None, seconds: float | None) -> tuple[int, float, float]:
    """(requests answered, audio seconds, wall seconds) for ``concurrency`` callers in a closed loop."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        done, audio, sent = 0, 0.0, 0
        started = time.perf_counter()
        stop_at = started + seconds if seconds is not None else float("inf")

        async def caller() -> None:
            nonlocal done, audio, sent
            while (jobs is None or sent < jobs) and time.perf_counter() < stop_at:
                i = sent
                sent += 1
                upload = uploads[i % len(uploads)]
                reply = await client.post("/v1/audio/transcriptions", files={"file": ("a.wav", upload)}, data={"model": model})
                reply.raise_for_status()
                done += 1
                audio += (len(upload) - 44) / 2 / 16000

        await asyncio.gather(*(caller() for _ in range(concurrency)))
        return done, audio, time.perf_counter() - started


def _with_gateway(workdir: Path, label: str, providers: dict[str, Any]) -> tuple[AbstractContextManager[RunningHub], str]:
    port = free_port()
    return running_hub(workdir, label, providers, gateway={"enabled": True, "port": port}), f"http://127.0.0.1:{port}"


def measure(workdir: Path, clips: list[np.ndarray], plan: GatewayPlan) -> dict[str, Any]:
    result: dict[str, Any] = {"in_flight": IN_FLIGHT, "whisper_concurrency": WHISPER_CONCURRENCY}
    noop = np.resize(clips[0], 160)  # 10 ms, as in the overhead figures
    hub_cm, url = _with_gateway(workdir, "gateway-echo", {"echo": echo_provider(plan.whisper_workers)})
    with hub_cm as hub:
        _wait_ready(url)
        wait_for_quiet(plan.settle_s)
        sdk = percentiles([t * 1000 for t in _sdk_round_trips(hub.endpoint, noop, plan.round_trips)])
        http = percentiles([t * 1000 for t in _http_round_trips(url, wav_bytes(noop), plan.round_trips)])
        result["echo_latency_ms"] = {"sdk": sdk, "http": http, "added_p50": http["p50"] - sdk["p50"]}
        wait_for_quiet(plan.settle_s)
        done, _, wall = asyncio.run(_http_closed(url, [wav_bytes(noop)], "echo", IN_FLIGHT, None, plan.seconds))
        sdk_run = load.closed_loop(hub.endpoint, [noop], "echo", IN_FLIGHT, seconds=plan.seconds)
        result["echo_requests_per_s"] = {"http": done / wall, "sdk": len(sdk_run.samples) / sdk_run.wall_s}
    say(
        f"gateway: echo p50 {http['p50']:.2f} ms over HTTP against {sdk['p50']:.2f} ms through the SDK; "
        f"{result['echo_requests_per_s']['http']:.0f} req/s over HTTP, {result['echo_requests_per_s']['sdk']:.0f} through the SDK"
    )
    whisper = {"whisper": whisper_provider(plan.whisper_workers, 1, "cpu")}
    hub_cm, url = _with_gateway(workdir, "gateway-whisper", whisper)
    with hub_cm as hub:
        _wait_ready(url)
        load.warm_up(hub.endpoint, clips, "whisper", plan.whisper_workers)
        uploads = [wav_bytes(c) for c in clips]
        wait_for_quiet(plan.settle_s)
        run = load.closed_loop(hub.endpoint, clips, "whisper", WHISPER_CONCURRENCY, jobs=plan.whisper_jobs)
        sdk_audio_per_s = sum(s.audio_s for s in run.samples) / run.wall_s
        wait_for_quiet(plan.settle_s)
        _, audio, wall = asyncio.run(_http_closed(url, uploads, "whisper", WHISPER_CONCURRENCY, plan.whisper_jobs, None))
        result["whisper_audio_per_s"] = {"sdk": sdk_audio_per_s, "http": audio / wall}
        result["whisper_http_vs_sdk"] = (audio / wall) / sdk_audio_per_s
    say(
        f"gateway: whisper at C={WHISPER_CONCURRENCY}: {audio / wall:.1f} audio s/s over HTTP, "
        f"{sdk_audio_per_s:.1f} through the SDK ({result['whisper_http_vs_sdk']:.1%})"
    )
    return result
