"""What one measured configuration produced, reduced to the figures the report compares."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Sample:
    """One answered request: how long the caller waited for it, for how much audio."""

    latency_s: float
    audio_s: float
    done_at: float  # time.perf_counter() when the answer arrived
    queue_ms: float | None = None  # the hub's own account of the wait for a worker (None: no hub)
    inference_ms: float | None = None  # the worker's own account of its time on the job (None: no hub)


@dataclass(frozen=True)
class Run:
    """The samples of one load run and the wall time from its first request to its last answer."""

    samples: list[Sample]
    wall_s: float

    @property
    def audio_per_s(self) -> float:
        return sum(s.audio_s for s in self.samples) / self.wall_s

    @property
    def requests_per_s(self) -> float:
        return len(self.samples) / self.wall_s

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(data: dict[str, Any]) -> Run:
        """A run measured in another process (a peer's client), read back from its JSON."""
        return Run([Sample(**s) for s in data["samples"]], float(data["wall_s"]))


def percentiles(values: list[float]) -> dict[str, float]:
    """p50, p95, p99 and the mean, by linear interpolation (with few samples p99 is close to the max)."""
    if not values:
        return {"p50": float("nan"), "p95": float("nan"), "p99": float("nan"), "mean": float("nan")}
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99), "mean": float(np.mean(values))}


@dataclass
class Cell:
    """One configuration of the matrix: who served the jobs, how many callers at once, what came out."""

    kind: str  # direct | ceiling | single | pool | load80
    workers: int  # model processes serving
    threads: int  # cpu_threads (and OMP_NUM_THREADS) of each
    concurrency: int  # requests in flight (closed loop) or offered rate's jobs (load80); processes for bare runs
    jobs: int
    audio_s: float
    wall_s: float
    latency_ms: dict[str, float]
    rtf_p50: float  # per request: latency ÷ audio duration
    queue_ms_p50: float | None
    inference_ms_p50: float | None  # the worker's time on a job: latency minus this is transport and queueing
    rss_mb: list[float]  # peak RSS of each model process
    usage: dict[str, float | None] = field(default_factory=dict)  # CPU (and GPU) utilisation, see procstats

    @staticmethod
    def of(kind: str, workers: int, threads: int, concurrency: int, run: Run) -> Cell:
        queue = [s.queue_ms for s in run.samples if s.queue_ms is not None]
        inference = [s.inference_ms for s in run.samples if s.inference_ms is not None]
        return Cell(
            kind=kind,
            workers=workers,
            threads=threads,
            concurrency=concurrency,
            jobs=len(run.samples),
            audio_s=sum(s.audio_s for s in run.samples),
            wall_s=run.wall_s,
            latency_ms=percentiles([s.latency_s * 1000 for s in run.samples]),
            rtf_p50=float(np.median([s.latency_s / s.audio_s for s in run.samples])),
            queue_ms_p50=float(np.median(queue)) if queue else None,
            inference_ms_p50=float(np.median(inference)) if inference else None,
            rss_mb=[],
        )

    @property
    def audio_per_s(self) -> float:
        """Throughput: seconds of audio transcribed per wall-clock second."""
        return self.audio_s / self.wall_s

    @property
    def requests_per_s(self) -> float:
        return self.jobs / self.wall_s

    @property
    def label(self) -> str:
        return f"{self.kind} N={self.workers}×{self.threads}t C={self.concurrency}"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "audio_per_s": self.audio_per_s, "requests_per_s": self.requests_per_s}
