"""Jobs, the bounded per-provider queue they wait in, and their deadlines.

A full queue rejects at once (``POOL_BUSY``): explicit backpressure instead of an
unbounded backlog. Queued jobs expire at their acquire deadline (``ACQUIRE_TIMEOUT``);
running jobs at a deadline scaled to the audio length (``JOB_TIMEOUT``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from hub.config import PoolConfig
from hub.errors import PoolBusy
from hub.protocol import SAMPLE_RATE, AudioRef, Resume, RingRef
from hub.resume import AudioTail

HEALTH_CLIP_SAMPLES = 2 * SAMPLE_RATE  # an upper bound of the bundled clip's length, for its deadline


@dataclass(eq=False)
class Job:
    """One client request on its way through the supervisor."""

    id: str
    client: bytes
    request: str
    provider: str
    audio: AudioRef
    payload: bytes | None
    options: dict[str, Any]
    stream: bool
    received_at: float
    acquire_deadline: float
    client_timeout: float | None
    attempts: int = 0
    worker: str | None = None
    started_at: float = 0.0
    run_deadline: float = field(default=float("inf"))
    health: bool = False  # a health check: the worker transcribes its own bundled clip, no client waits
    session: bool = False  # a live session: one of the several its worker serves, until closed
    ring: RingRef | None = None
    last_activity: float = 0.0
    closing: str = ""  # why the session is being closed, once it is
    streamed: int = 0  # samples a session has received
    route: str = ""  # the route that chose this job's provider, "" when the client named the provider
    shadow: bool = False  # a shadow job: no client waits; its answer is only compared with the primary's
    pair: str = ""  # the primary job's id, on a primary with a shadow and on its shadow
    # a live session, kept so that another worker can take it over (``hub.resume``)
    finals: list[dict[str, Any]] = field(default_factory=list)  # every final segment forwarded to the client
    keep: int = 0  # the first sample a worker taking over needs (the worker's last word on it)
    tail: AudioTail | None = None  # an inline session's recent audio
    carried: int = 0  # finals confirmed before the last resume: the current worker does not know them all
    resume: Resume | None = None  # set while the session waits to move to another worker

    @property
    def audio_seconds(self) -> float:
        return (self.streamed if self.session else self.audio.samples) / SAMPLE_RATE

    def job_body(self) -> dict[str, Any]:
        """The JOB (or STREAM_OPEN) message a worker receives (the payload frame travels beside it)."""
        if self.health:
            return {"health": True}
        if self.session:
            body = {"ring": self.ring.to_dict() if self.ring else None, "options": self.options}
            return {**body, "resume": self.resume.to_dict()} if self.resume else body
        return {"audio": self.audio.to_dict(), "options": self.options, "stream": self.stream}


def health_job(job_id: str, provider: str, now: float) -> Job:
    """A health check: the worker knows the clip, so the job carries no audio."""
    return Job(
        id=job_id,
        client=b"",
        request="",
        provider=provider,
        audio=AudioRef(samples=HEALTH_CLIP_SAMPLES),
        payload=None,
        options={},
        stream=False,
        received_at=now,
        acquire_deadline=now,
        client_timeout=None,
        health=True,
    )


def acquire_deadline(pool: PoolConfig, now: float, client_timeout: float | None) -> float:
    """A queued job waits at most ``acquire_timeout``, and never longer than its client will."""
    wait = pool.acquire_timeout if client_timeout is None else min(pool.acquire_timeout, client_timeout)
    return now + wait


def run_deadline(pool: PoolConfig, job: Job, now: float) -> float:
    """A running job may take ``job_timeout`` plus an allowance per second of audio; a session, its
    ``max_session_seconds`` (when the hub closes it) plus ``job_timeout`` to flush."""
    if job.session:
        return now + pool.max_session_seconds + pool.job_timeout
    return now + pool.job_timeout + pool.job_timeout_per_audio_second * job.audio.seconds


class JobQueue:
    """FIFO of jobs waiting for a worker of one provider, bounded by ``max_queue``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._jobs: deque[Job] = deque()

    def __len__(self) -> int:
        return len(self._jobs)

    def __iter__(self) -> Iterator[Job]:
        return iter(self._jobs)

    def push(self, job: Job) -> None:
        if len(self._jobs) >= self.limit:
            raise PoolBusy(
                f"provider {job.provider!r} has {len(self._jobs)} jobs waiting (pool.max_queue={self.limit}); "
                "retry shortly or raise pool.max_size / pool.max_queue",
                job_id=job.request,
            )
        self._jobs.append(job)

    def push_front(self, job: Job) -> None:
        """Put back a job whose worker died, ahead of newer ones; retries may exceed the bound by one."""
        self._jobs.appendleft(job)

    def peek(self) -> Job | None:
        return self._jobs[0] if self._jobs else None

    def pop(self) -> Job | None:
        return self._jobs.popleft() if self._jobs else None

    def remove(self, job: Job) -> None:
        self._jobs.remove(job)

    def expired(self, now: float) -> list[Job]:
        """Take out and return the jobs whose acquire deadline has passed."""
        gone = [j for j in self._jobs if j.acquire_deadline <= now]
        for job in gone:
            self._jobs.remove(job)
        return gone

    def clear(self) -> list[Job]:
        jobs = list(self._jobs)
        self._jobs.clear()
        return jobs
