"""Jobs: their kinds, their one lifecycle, the table that owns them, the bounded queue, their deadlines.

A job is one piece of work on a worker: a client's request or live session, a health check, a
shadow copy of a routed request, or a part of a long request split across the pool (its plan, then
its pieces: jobs the request owns, with no client of their own). It moves through ``JobState`` only by ``Jobs.set_state``, which
checks the move against ``TRANSITIONS`` (pure, unit-tested):

- NEW → QUEUED or RUNNING: placed in its provider's queue, or straight on a worker;
- NEW → SPLIT: a long request whose plan and pieces run as jobs of their own (it is on no worker);
- SPLIT → DONE: every piece answered, one failed for good, or its client gave up;
- QUEUED → RUNNING: a worker took it;
- RUNNING → CLOSING: a session told to flush and answer;
- RUNNING or CLOSING → QUEUED: its worker died and it is retried (a closing session is told again on its new worker);
- RUNNING or CLOSING → ABANDONED: its client gave up; it ends on its worker and its answer goes nowhere;
- QUEUED, RUNNING, CLOSING or ABANDONED → DONE: answered, failed, expired, or given up while queued.

A job's ``request_id`` is the client's name for it (every reply carries it); its ``id`` is the hub's
name on the backend (every message to and from a worker carries it). A full queue rejects at once
(``POOL_BUSY``; a split request counts once, however many of its pieces wait): explicit backpressure instead
of an unbounded backlog. Queued jobs expire at their acquire deadline (``ACQUIRE_TIMEOUT``); running jobs at a
deadline scaled to the audio length (``JOB_TIMEOUT``).
"""

from __future__ import annotations

import itertools
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from hub.config import PoolConfig
from hub.errors import PoolBusy
from hub.protocol import SAMPLE_RATE, AudioRef, Resume, RingRef
from hub.resume import AudioTail

HEALTH_CLIP_SAMPLES = 2 * SAMPLE_RATE  # an upper bound of the bundled clip's length, for its deadline


class JobKind(str, Enum):
    """What a job is for."""

    REQUEST = "request"  # a client's TRANSCRIBE: one answer (its segments first, when it streams)
    SESSION = "session"  # a client's live stream: chunks in, segments out, one answer at its close
    HEALTH = "health"  # the hub's check of an idle worker on the bundled clip: no client
    SHADOW = "shadow"  # a copy of a routed request for the route's shadow provider: no client, its answer is compared
    PLAN = "plan"  # where to cut a long request: a worker's VAD pass over its audio, answering each piece as found
    PIECE = "piece"  # one piece of a long request's audio (an offset into its segment), decoded alone

    @property
    def has_client(self) -> bool:
        return self in (JobKind.REQUEST, JobKind.SESSION)


# a job's id starts with its kind's letter, for a person reading the logs (nothing reads it back)
_ID_LETTER = {
    JobKind.REQUEST: "j",
    JobKind.SESSION: "s",
    JobKind.HEALTH: "h",
    JobKind.SHADOW: "w",
    JobKind.PLAN: "c",
    JobKind.PIECE: "p",
}


class JobState(str, Enum):
    NEW = "new"  # admitted, not placed yet
    QUEUED = "queued"  # in its provider's queue, waiting for a worker (also a session moving to another worker)
    RUNNING = "running"  # on a worker
    CLOSING = "closing"  # a session on a worker, told to flush and answer
    ABANDONED = "abandoned"  # on a worker, but its client gave up: it ends there and its answer is dropped
    SPLIT = "split"  # a long request cut into pieces: its plan and pieces are the jobs on workers
    DONE = "done"  # answered or failed: out of the table


TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.NEW: frozenset({JobState.QUEUED, JobState.RUNNING, JobState.SPLIT}),
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.DONE}),
    JobState.RUNNING: frozenset({JobState.CLOSING, JobState.ABANDONED, JobState.QUEUED, JobState.DONE}),
    JobState.CLOSING: frozenset({JobState.ABANDONED, JobState.QUEUED, JobState.DONE}),
    JobState.ABANDONED: frozenset({JobState.DONE}),
    JobState.SPLIT: frozenset({JobState.DONE}),
    JobState.DONE: frozenset(),
}


class JobStateError(RuntimeError):
    """A move the lifecycle does not have: a bug in the hub, never a client's fault."""


def check_transition(old: JobState, new: JobState) -> None:
    """Raise ``JobStateError`` unless ``TRANSITIONS`` allows ``old`` → ``new``."""
    if new not in TRANSITIONS[old]:
        raise JobStateError(f"a job cannot go from {old.value} to {new.value}")


@dataclass(eq=False)
class Job:
    """One piece of work on its way through the supervisor; its state changes only through ``Jobs``."""

    id: str  # the hub's name for it, on the backend
    kind: JobKind
    client: bytes  # the client's socket identity; b"" for a job no client asked for (health, shadow)
    request_id: str  # the client's name for it, on the frontend; "" without a client
    provider: str
    audio: AudioRef
    payload: bytes | None
    options: dict[str, Any]
    stream: bool
    received_at: float
    acquire_deadline: float
    client_timeout: float | None
    state: JobState = JobState.NEW
    attempts: int = 0
    worker: str | None = None
    started_at: float = 0.0
    run_deadline: float = field(default=float("inf"))
    ring: RingRef | None = None
    last_activity: float = 0.0
    close_reason: str = ""  # why the session is being closed, once it is (kept while it moves to another worker)
    streamed: int = 0  # samples a session has received
    route: str = ""  # the route that chose this job's provider, "" when the client named the provider
    pair: str = ""  # the primary job's id, on a primary with a shadow and on its shadow
    # a live session, kept so that another worker can take it over (``hub.resume``)
    finals: list[dict[str, Any]] = field(default_factory=list)  # every final segment forwarded to the client
    keep: int = 0  # the first sample a worker taking over needs (the worker's last word on it)
    tail: AudioTail | None = None  # an inline session's recent audio
    carried: int = 0  # finals confirmed before the last resume: the current worker does not know them all
    resume: Resume | None = None  # set while the session waits to move to another worker
    turns: dict[str, Any] | None = None  # a session's own stream.vad settings (None: a client from before VAD)
    owner: str = ""  # a plan's or a piece's request (its job id)
    index: int = -1  # a piece's place in its request's plan

    @property
    def group(self) -> str:
        """Whose work this is, for the queue's fairness and bound: a plan's or piece's request, else itself."""
        return self.owner or self.id

    @property
    def client_waits(self) -> bool:
        """Whether a client still waits for this job's replies (not a health check, a shadow or an abandoned job)."""
        return self.kind.has_client and self.state is not JobState.ABANDONED and self.state is not JobState.DONE

    @property
    def audio_seconds(self) -> float:
        return (self.streamed if self.kind is JobKind.SESSION else self.audio.samples) / SAMPLE_RATE

    def job_body(self) -> dict[str, Any]:
        """The JOB (or STREAM_OPEN) message a worker receives (the payload frame travels beside it)."""
        if self.kind is JobKind.HEALTH:
            return {"health": True}
        if self.kind is JobKind.SESSION:
            body = {
                "ring": self.ring.to_dict() if self.ring else None,
                "options": self.options,
                "turn_detection": self.turns,
            }
            return {**body, "resume": self.resume.to_dict()} if self.resume else body
        if self.kind is JobKind.PLAN:
            return {"audio": self.audio.to_dict(), "plan": self.options}
        job = {"audio": self.audio.to_dict(), "options": self.options, "stream": self.stream}
        return {**job, "piece": True} if self.kind is JobKind.PIECE else job


def health_job(job_id: str, provider: str, now: float) -> Job:
    """A health check: the worker knows the clip, so the job carries no audio."""
    return Job(
        id=job_id,
        kind=JobKind.HEALTH,
        client=b"",
        request_id="",
        provider=provider,
        audio=AudioRef(samples=HEALTH_CLIP_SAMPLES),
        payload=None,
        options={},
        stream=False,
        received_at=now,
        acquire_deadline=now,
        client_timeout=None,
    )


def acquire_deadline(pool: PoolConfig, now: float, client_timeout: float | None) -> float:
    """A queued job waits at most ``acquire_timeout``, and never longer than its client will."""
    wait = pool.acquire_timeout if client_timeout is None else min(pool.acquire_timeout, client_timeout)
    return now + wait


def run_deadline(pool: PoolConfig, job: Job, now: float) -> float:
    """A running job may take ``job_timeout`` plus an allowance per second of audio; a session, its
    ``max_session_seconds`` (when the hub closes it) plus ``job_timeout`` to flush."""
    if job.kind is JobKind.SESSION:
        return now + pool.max_session_seconds + pool.job_timeout
    return now + pool.job_timeout + pool.job_timeout_per_audio_second * job.audio.seconds


def session_overdue(pool: PoolConfig, job: Job, now: float) -> str:
    """Why an open session is closed now ("" while it may go on): no audio for ``session_idle_timeout``,
    or open longer than ``max_session_seconds``."""
    if now - job.last_activity > pool.session_idle_timeout:
        return f"no audio for {now - job.last_activity:.0f} s (pool.session_idle_timeout={pool.session_idle_timeout:g})"
    if now - job.started_at > pool.max_session_seconds:
        return f"open longer than pool.max_session_seconds={pool.max_session_seconds:g}"
    return ""


class JobQueue:
    """Jobs waiting for a worker of one provider, bounded by ``max_queue`` requests.

    Oldest first, except that the pieces of a split request take turns with other requests: the next job
    is one of the requests with the fewest jobs on workers, of those the one whose last job started longest
    ago (never: first), of those the oldest (``next``). So a short request that arrives behind a long one's
    queued pieces waits only for the pieces already running, even on one worker, and two long requests take
    turns. The bound counts requests, not pieces: a split request's pieces never make another's ``POOL_BUSY``.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._jobs: deque[Job] = deque()

    def __len__(self) -> int:
        return len(self._jobs)

    def __iter__(self) -> Iterator[Job]:
        return iter(self._jobs)

    def push(self, job: Job) -> None:
        """At the back; a piece always (its request was admitted), any other job only within the bound."""
        waiting = len({j.group for j in self._jobs})
        if job.kind is not JobKind.PIECE and waiting >= self.limit:
            raise PoolBusy(
                f"provider {job.provider!r} has {waiting} requests waiting (pool.max_queue={self.limit}); "
                "retry shortly or raise pool.max_size / pool.max_queue",
                request_id=job.request_id,
            )
        self._jobs.append(job)

    def push_front(self, job: Job) -> None:
        """Put back a job whose worker died, ahead of newer ones; retries may exceed the bound by one."""
        self._jobs.appendleft(job)

    def peek(self) -> Job | None:
        return self._jobs[0] if self._jobs else None

    def next(self, running: Counter[str], turns: dict[str, int]) -> Job | None:
        """The job to start next: by the fewest jobs of its request on workers (``running``, by ``Job.group``),
        then the longest since its request's last turn (``turns``: when its last job started, a count), then
        the oldest; plain FIFO while no split request waits."""
        if not any(j.owner for j in self._jobs):
            return self.peek()
        return min(
            self._jobs, key=lambda j: (running[j.group], turns.get(j.group, -1)), default=None
        )  # the first of equals

    def remove(self, job: Job) -> None:
        self._jobs.remove(job)

    def expired(self, now: float) -> list[Job]:
        """The jobs whose acquire deadline has passed (still queued: failing them takes them out)."""
        return [j for j in self._jobs if j.acquire_deadline <= now]


class Jobs:
    """Every job in flight, by its id and, for a client's, by (client, request id); the queue of each provider.

    The only place a job changes state (``set_state``); placing, starting, moving, abandoning and
    finishing a job are its operations here. The farm does the rest (messages, accounting); its
    workforce (``hub.workforce``) keeps the workers.
    """

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self._by_id: dict[str, Job] = {}  # every job not done
        self._by_request: dict[tuple[bytes, str], Job] = {}  # a client's jobs it still waits for
        self._queues: dict[str, JobQueue] = {}
        self._turns = itertools.count()
        self._last_turn: dict[str, int] = {}  # when each request's (or session's) last job started, a count

    def new_id(self, kind: JobKind) -> str:
        return f"{_ID_LETTER[kind]}{next(self._ids)}"

    def set_state(self, job: Job, state: JobState) -> None:
        """The one method that changes a job's state; a move the lifecycle does not have raises."""
        check_transition(job.state, state)
        job.state = state

    # --- the providers' queues ------------------------------------------------------

    def add_provider(self, provider: str, limit: int) -> None:
        """A provider's queue, new or with a new bound (``pool.max_queue``)."""
        if provider in self._queues:
            self._queues[provider].limit = limit
        else:
            self._queues[provider] = JobQueue(limit)

    def drop_provider(self, provider: str) -> None:
        del self._queues[provider]

    def waiting(self, provider: str) -> list[Job]:
        """The provider's queued jobs, oldest first."""
        return list(self._queues[provider])

    def queued(self, provider: str) -> int:
        return len(self._queues[provider])

    def next_waiting(self, provider: str) -> Job | None:
        """The provider's job to start next (``JobQueue.next``)."""
        running = Counter(j.group for j in self._by_id.values() if j.worker is not None and j.provider == provider)
        return self._queues[provider].next(running, self._last_turn)

    def expired(self, provider: str, now: float) -> list[Job]:
        return self._queues[provider].expired(now)

    # --- a job's operations ------------------------------------------------------------

    def place(self, job: Job, queued: bool) -> None:
        """Take a new job in: at the back of its provider's queue (POOL_BUSY, and not taken, when that is
        full), or ready to ``start`` on the worker found for it."""
        if queued:
            self._queues[job.provider].push(job)
            self.set_state(job, JobState.QUEUED)
        self._by_id[job.id] = job
        if job.kind.has_client:
            self._by_request[(job.client, job.request_id)] = job

    def start(self, job: Job, worker_id: str) -> None:
        """The job goes to a worker (out of the queue if it waited there)."""
        if job.state is JobState.QUEUED:
            self._queues[job.provider].remove(job)
        self.set_state(job, JobState.RUNNING)
        job.attempts += 1
        job.worker = worker_id
        self._last_turn[job.group] = next(self._turns)

    def close(self, job: Job) -> None:
        """A session on a worker has been told to flush and answer."""
        self.set_state(job, JobState.CLOSING)

    def requeue(self, job: Job) -> None:
        """The job's worker is gone and it is retried: first in its provider's queue, ahead of newer jobs."""
        self.set_state(job, JobState.QUEUED)
        job.worker = None
        self._queues[job.provider].push_front(job)

    def abandon(self, job: Job) -> None:
        """The client gave up on a job a worker has: it ends there, and its answer goes nowhere."""
        self.set_state(job, JobState.ABANDONED)
        if job.kind.has_client:
            del self._by_request[(job.client, job.request_id)]

    def split(self, job: Job) -> None:
        """Take in a long request whose plan and pieces run as jobs of their own (``JobKind.PLAN``, ``PIECE``)."""
        self.set_state(job, JobState.SPLIT)
        self._by_id[job.id] = job
        self._by_request[(job.client, job.request_id)] = job

    def finish(self, job: Job) -> None:
        """Answered or failed: out of the table (and of its queue)."""
        if job.state is JobState.QUEUED:
            self._queues[job.provider].remove(job)
        self.set_state(job, JobState.DONE)
        self._by_id.pop(job.id, None)
        self._last_turn.pop(job.id, None)  # a request (or any job of its own group) is over
        if job.kind.has_client and self._by_request.get((job.client, job.request_id)) is job:
            del self._by_request[(job.client, job.request_id)]

    # --- lookups -----------------------------------------------------------------------

    def get(self, job_id: str) -> Job | None:
        return self._by_id.get(job_id)

    def of_request(self, client: bytes, request_id: str) -> Job | None:
        """The job a client still waits for under ``request_id``."""
        return self._by_request.get((client, request_id))

    def on_workers(self) -> list[Job]:
        """Every job a worker has (running, closing or abandoned)."""
        return [j for j in self._by_id.values() if j.worker is not None]

    def owned(self, owner: str) -> list[Job]:
        """The plan and pieces of the split request ``owner`` still in flight."""
        return [j for j in self._by_id.values() if j.owner == owner]

    def pieces(self, provider: str) -> int:
        """Pieces of split requests on the provider's workers (abandoned ones too: they hold their worker)."""
        return sum(
            1
            for j in self._by_id.values()
            if j.kind is JobKind.PIECE and j.provider == provider and j.worker is not None
        )

    def live_sessions(self) -> list[Job]:
        """Every live session its client still waits for, open or waiting for a worker."""
        return [j for j in self._by_request.values() if j.kind is JobKind.SESSION]

    def sessions(self, provider: str) -> int:
        """Live sessions of ``provider`` their clients still wait for, open or waiting for a worker."""
        return sum(1 for j in self.live_sessions() if j.provider == provider)

    @property
    def in_flight(self) -> int:
        """Clients' jobs and sessions not answered yet, queued or on a worker."""
        return len(self._by_request)
