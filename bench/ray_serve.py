"""The Ray side of ``make bench-peers``: Ray Serve doing the hub's work, driven by ``bench.peers``.

It runs only in ``.venv-peers`` (the project never depends on Ray). ``python -m bench.ray_serve PORT TEMP_DIR``
starts a local Ray cluster (its files under TEMP_DIR) and Serve with its HTTP proxy on 127.0.0.1:PORT (Ray's
internal gRPC servers bind the machine's address whatever one asks: Ray resolves 127.0.0.1 to it), then
takes one JSON command per line on stdin and answers each with one JSON line on stdout; everything Ray and
Serve print goes to stderr. When stdin closes (the driver finished, failed or died)
it shuts Serve and Ray down; ``bench.rayproc`` removes whatever is left.

An application is two replicas of one CPU each with ``max_ongoing_requests=1``: the hub's pool of two
1-thread workers that take one job at a time. The replicas inherit this process's environment, which
``bench.rayproc`` sets to the hub workers' thread settings, and load tiny.en as the bare processes do
(``bench.bare.open_model``). Serve's per-request access log is off: the hub logs no line per request either.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray import serve
from ray.serve.handle import DeploymentHandle
from ray.serve.schema import LoggingConfig
from starlette.requests import Request

from bench.bare import open_model
from bench.clips import build_clips, duration, of_length
from bench.gateway import ROUTE
from bench.load import closed_calls, timed_calls
from bench.overhead import NOOP_SAMPLES
from bench.rayproc import REPLICAS
from bench.stats import Run, Sample
from hub.audio import SAMPLE_RATE, decode_bytes

QUIET = LoggingConfig(enable_access_log=False)


def _nothing(pcm: np.ndarray) -> str:
    return ""


@serve.deployment(
    num_replicas=REPLICAS, max_ongoing_requests=1, ray_actor_options={"num_cpus": 1}, logging_config=QUIET
)
class Transcriber:
    """One replica: tiny.en on one thread (``kind="whisper"``), or nothing at all (``"echo"``, the no-op that
    measures Serve's own cost, as the echo provider measures the hub's)."""

    def __init__(self, kind: str) -> None:
        self.engine: Callable[[np.ndarray], str] = open_model(1, "cpu") if kind == "whisper" else _nothing

    def transcribe(self, pcm: np.ndarray) -> dict[str, str]:
        """The handle's call: PCM in, text out, as ``AsyncHubClient.transcribe``."""
        return {"text": self.engine(pcm)}

    async def __call__(self, request: Request) -> dict[str, str]:
        """The HTTP route: an OpenAI-style multipart upload, decoded as the hub's gateway decodes it."""
        form = await request.form()
        upload: Any = form["file"]
        return self.transcribe(decode_bytes(await upload.read()))


class Commands:
    """What the driver may ask for; each returns what goes back as JSON."""

    def __init__(self) -> None:
        clips = build_clips()
        self.audio = {"speech": clips, "noop": [of_length(NOOP_SAMPLES / SAMPLE_RATE, clips)]}
        self.handle: DeploymentHandle | None = None
        self.app: str | None = None

    def deploy(self, kind: str) -> dict[str, float]:
        """Replace the running application with ``kind``; warm each replica with one request, all at once (as
        ``bench.load.warm_up`` warms the hub's workers), and say when the first answer came."""
        if self.app is not None:
            serve.delete(self.app)
        self.handle = serve.run(Transcriber.bind(kind), name=kind, route_prefix=ROUTE)
        self.app = kind
        run = self.closed("speech" if kind == "whisper" else "noop", REPLICAS, REPLICAS, None)
        return {
            "first_answer_at": min(s["done_at"] for s in run["samples"])
        }  # perf_counter: CLOCK_MONOTONIC, system-wide

    def closed(self, audio: str, concurrency: int, jobs: int | None, seconds: float | None) -> dict[str, Any]:
        """``concurrency`` callers through the handle, as ``bench.load.closed_loop`` drives the SDK."""
        handle, pcms = self._handle(), self.audio[audio]

        async def call(i: int) -> Sample:
            pcm = pcms[i % len(pcms)]
            sent = time.perf_counter()
            await handle.transcribe.remote(pcm)
            done = time.perf_counter()
            return Sample(done - sent, duration(pcm), done)

        run: Run = asyncio.run(closed_calls(call, concurrency, jobs, seconds))
        return run.to_dict()

    def round_trips(self, count: int, warm: int) -> list[float]:
        """The no-op one request at a time through the handle, as ``HubClient`` is timed."""
        handle, pcm = self._handle(), self.audio["noop"][0]
        return timed_calls(lambda: handle.transcribe.remote(pcm).result(), count, warm)

    def _handle(self) -> DeploymentHandle:
        if self.handle is None:
            raise RuntimeError("no application deployed: send a deploy command first")
        return self.handle


def _stop(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # through the finally below, which shuts Ray down


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ray_serve", description=__doc__)
    parser.add_argument("port", type=int, help="the HTTP proxy's port on 127.0.0.1")
    parser.add_argument("temp_dir", type=Path, help="Ray's session files (logs, sockets)")
    args = parser.parse_args(argv)
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # Ray and Serve print to stdout; only the replies may go there
    signal.signal(signal.SIGTERM, _stop)
    try:
        ray.init(_temp_dir=str(args.temp_dir), log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": args.port}, logging_config=QUIET)
        commands = Commands()
        for line in sys.stdin:
            command = json.loads(line)
            op = command.pop("op")
            if op not in ("deploy", "closed", "round_trips"):
                raise ValueError(f"unknown command {op!r}")
            replies.write(json.dumps(getattr(commands, op)(**command)) + "\n")
    finally:
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
