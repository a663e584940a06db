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
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench import load
from bench.hubproc import RunningHub, echo_provider, free_port, running_hub, whisper_provider
from bench.overhead import hub_round_trips
from bench.procstats import wait_for_quiet
from bench.progress import say
from bench.stats import Run, Sample, percentiles

IN_FLIGHT = 32
WHISPER_CONCURRENCY = 4
READY_TIMEOUT_S = 60.0
ROUTE = "/v1/audio/transcriptions"  # the OpenAI route; bench.ray_serve serves it too


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


def wait_ready(url: str, path: str = "/readyz", expect: str = "") -> None:
    """Until ``url + path`` answers 200 with ``expect`` in its body (the gateway's readiness probe; a peer's
    route table)."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + path, timeout=2) as reply:
                if reply.status == 200 and expect in reply.read().decode(errors="replace"):
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url}{path} did not get ready")


def http_round_trips(url: str, upload: bytes, count: int) -> list[float]:
    """Seconds per echo upload to an OpenAI-style ``/v1/audio/transcriptions``, one request at a time."""
    with httpx.Client(base_url=url, timeout=60) as client:

        def post() -> None:
            reply = client.post(ROUTE, files={"file": ("a.wav", upload)}, data={"model": "echo"})
            reply.raise_for_status()

        return load.timed_calls(post, count, warm=20)


def upload_seconds(upload: bytes) -> float:
    """The audio in a 16-bit mono 16 kHz WAV of ``wav_bytes``."""
    return (len(upload) - 44) / 2 / 16000


async def http_closed(
    url: str, uploads: Sequence[bytes], model: str, concurrency: int, jobs: int | None, seconds: float | None
) -> Run:
    """``concurrency`` HTTP callers in a closed loop, uploading to ``ROUTE``."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:

        async def call(i: int) -> Sample:
            upload = uploads[i % len(uploads)]
            sent = time.perf_counter()
            reply = await client.post(ROUTE, files={"file": ("a.wav", upload)}, data={"model": model})
            reply.raise_for_status()
            done = time.perf_counter()
            return Sample(done - sent, upload_seconds(upload), done)

        return await load.closed_calls(call, concurrency, jobs, seconds)


def _with_gateway(
    workdir: Path, label: str, providers: dict[str, Any]
) -> tuple[AbstractContextManager[RunningHub], str]:
    port = free_port()
    return running_hub(workdir, label, providers, gateway={"enabled": True, "port": port}), f"http://127.0.0.1:{port}"


def measure(workdir: Path, clips: list[np.ndarray], plan: GatewayPlan) -> dict[str, Any]:
    result: dict[str, Any] = {"in_flight": IN_FLIGHT, "whisper_concurrency": WHISPER_CONCURRENCY}
    noop = np.resize(clips[0], 160)  # 10 ms, as in the overhead figures
    hub_cm, url = _with_gateway(workdir, "gateway-echo", {"echo": echo_provider(plan.whisper_workers)})
    with hub_cm as hub:
        wait_ready(url)
        wait_for_quiet(plan.settle_s)
        sdk = percentiles([t * 1000 for t in hub_round_trips(hub.endpoint, noop, plan.round_trips, warm=20)])
        http = percentiles([t * 1000 for t in http_round_trips(url, wav_bytes(noop), plan.round_trips)])
        result["echo_latency_ms"] = {"sdk": sdk, "http": http, "added_p50": http["p50"] - sdk["p50"]}
        wait_for_quiet(plan.settle_s)
        http_run = asyncio.run(http_closed(url, [wav_bytes(noop)], "echo", IN_FLIGHT, None, plan.seconds))
        sdk_run = load.closed_loop(hub.endpoint, [noop], "echo", IN_FLIGHT, seconds=plan.seconds)
        result["echo_requests_per_s"] = {"http": http_run.requests_per_s, "sdk": sdk_run.requests_per_s}
    say(
        f"gateway: echo p50 {http['p50']:.2f} ms over HTTP against {sdk['p50']:.2f} ms through the SDK; "
        f"{result['echo_requests_per_s']['http']:.0f} req/s over HTTP, {result['echo_requests_per_s']['sdk']:.0f} through the SDK"
    )
    whisper = {"whisper": whisper_provider(plan.whisper_workers, 1, "cpu")}
    hub_cm, url = _with_gateway(workdir, "gateway-whisper", whisper)
    with hub_cm as hub:
        wait_ready(url)
        load.warm_up(hub.endpoint, clips, "whisper", plan.whisper_workers)
        uploads = [wav_bytes(c) for c in clips]
        wait_for_quiet(plan.settle_s)
        run = load.closed_loop(hub.endpoint, clips, "whisper", WHISPER_CONCURRENCY, jobs=plan.whisper_jobs)
        sdk_audio_per_s = run.audio_per_s
        wait_for_quiet(plan.settle_s)
        http_run = asyncio.run(http_closed(url, uploads, "whisper", WHISPER_CONCURRENCY, plan.whisper_jobs, None))
        result["whisper_audio_per_s"] = {"sdk": sdk_audio_per_s, "http": http_run.audio_per_s}
        result["whisper_http_vs_sdk"] = http_run.audio_per_s / sdk_audio_per_s
    say(
        f"gateway: whisper at C={WHISPER_CONCURRENCY}: {http_run.audio_per_s:.1f} audio s/s over HTTP, "
        f"{sdk_audio_per_s:.1f} through the SDK ({result['whisper_http_vs_sdk']:.1%})"
    )
    return result
