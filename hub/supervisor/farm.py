"""The farm: the jobs on the pools' workers.

It admits new work (``admit``: the checks of ``hub.supervisor.admission``, then a job), places jobs on the least
recently used idle worker or in the provider's bounded queue, feeds queued jobs to workers as they come free,
forwards their answers, enforces deadlines, retries or fails what a lost worker leaves. Every job is in the
``Jobs`` table of ``hub.supervisor.jobs``, the only place its state changes. What only live sessions have
(their audio, close, resume and watch) is the ``Sessions`` room's (``hub.supervisor.sessions``); the workers
themselves (spawn, readiness, health checks, scaling, rolling restarts, exits, and every change to a worker's
record) are the ``Workforce``'s (``hub.supervisor.workforce``), which asks the farm, its ``Employer``, only what
the jobs' side knows. Clients are answered through the ``reply`` callable. The farm reads no clock and touches
no socket: the supervisor's loop passes ``now`` and does the I/O.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from hub import protocol
from hub.config import HubConfig
from hub.errors import (
    AcquireTimeout,
    BadRequest,
    HubError,
    JobTimeout,
    ProviderUnavailable,
    ShuttingDown,
    WorkerCrashed,
)
from hub.protocol import Message, MsgType
from hub.resume import merge_result
from hub.supervisor import admission
from hub.supervisor.assignment import WorkerLoad, one_shot_home
from hub.supervisor.jobs import Job, JobKind, Jobs, JobState, health_job, run_deadline
from hub.supervisor.metrics import Metrics
from hub.supervisor.pieces import Pieces, wants_split
from hub.supervisor.pool import ProviderPool, WorkerHandle, WorkerState
from hub.supervisor.release.rollout import Rollout
from hub.supervisor.release.routes import Unavailable
from hub.supervisor.sessions import Sessions
from hub.supervisor.views import PoolView
from hub.supervisor.workforce import Workforce

log = logging.getLogger("hub.supervisor")

Reply = Callable[[bytes, MsgType, str, dict[str, Any]], None]


class Farm:
    """Every job in flight on the workforce's pools, behind the small surface the supervisor calls."""

    def __init__(
        self,
        config: HubConfig,
        jobs: Jobs,
        workforce: Workforce,
        sessions: Sessions,
        reply: Reply,
        metrics: Metrics,
        rollout: Rollout,
    ) -> None:
        self.config = config
        self.shm_prefix = workforce.shm_prefix
        self.reply = reply
        self.metrics = metrics
        self.jobs = jobs  # every job in flight, and the providers' queues (shared with the sessions' room)
        for provider in config.enabled_providers:
            self.jobs.add_provider(provider.name, provider.pool.max_queue)
        self.workforce = workforce  # the pools and their workers
        workforce.employer = self
        self.sessions = sessions  # what only live sessions have
        self.stopping = False  # the hub is shutting down: no new job, no health check, no scaling
        self.rollout = rollout  # routes: which provider a routed request goes to, shadows, the end of every routed job
        self.inline_bytes = 0  # PCM bytes that crossed the supervisor (only clients without shared memory)
        # long requests split into pieces across the pool (``hub.supervisor.pieces``)
        self.pieces = Pieces(
            self.jobs, metrics, self.place, self.fail, self._split_answered, self._split_segment, self._abandon
        )

    @property
    def pools(self) -> dict[str, ProviderPool]:
        """The workforce's pools, by provider name."""
        return self.workforce.pools

    # --- what the supervisor calls -------------------------------------------------

    def admit(self, client: bytes, msg: Message, now: float) -> None:
        """Turn a client's TRANSCRIBE or STREAM_OPEN into a job and place it, or raise the error that refuses it."""
        try:
            job = self._admitted(client, msg, now)
            if job.kind is JobKind.SESSION:
                log.info("session %s: opened by request %s for %s", job.id, msg.id, job.provider)
            else:
                log.debug("job %s: request %s for %s, %.2f s of audio", job.id, msg.id, job.provider, job.audio.seconds)
            pool = self.pools[job.provider].config.pool
            if job.kind is JobKind.REQUEST and wants_split(job.audio.samples, pool, protocol.parse_split(msg.body)):
                self.pieces.start(job, pool, job.received_at)
            else:
                self.place(job, job.received_at)
        except HubError as exc:
            name = msg.body.get("provider") or self.config.enabled_providers[0].name
            known = isinstance(name, str) and name in self.config.providers
            self.metrics.rejected(name if known else "_unknown", exc.code)
            log.debug("request %s refused: %s", msg.id, exc)
            raise
        shadow = (
            self.rollout.shadow_for(job.route, self.unavailable())
            if job.route and job.kind is JobKind.REQUEST
            else None
        )
        if shadow is not None:
            self._shadow(job, shadow, now)

    def cancel(self, client: bytes, request_id: str, now: float) -> None:
        """The client gave up (its timeout): a queued job is dropped; one on a worker is abandoned there (it
        finishes, a session flushes) and its answer goes nowhere."""
        job = self.jobs.of_request(client, request_id)
        if job is None:
            return
        where = f"on {job.worker}" if job.worker else "in the queue"
        log.info(
            "job %s (request %s): cancelled by its client after %.1f s %s (state %s, attempt %d)",
            job.id,
            job.request_id,
            now - job.received_at,
            where,
            job.state.value,
            job.attempts,
        )
        self._record(job, "JOB_TIMEOUT", now)
        if job.state is JobState.SPLIT:
            self.pieces.cancel(job)
            return
        if job.state is JobState.QUEUED:
            self.jobs.finish(job)
            return
        if job.kind is JobKind.SESSION:
            self.sessions.close_session(job, "the client went away", now)
            self.jobs.abandon(job)
        else:
            self._abandon(job)

    def _abandon(self, job: Job) -> None:
        """Give up a job on a worker: one it holds and has not started leaves its next batch (CANCEL), one it
        decodes finishes; either way its answer goes nowhere."""
        if job.worker is not None:
            self.workforce.send(job.worker, MsgType.CANCEL, job.id)
        self.jobs.abandon(job)

    def on_worker(self, identity: bytes, msg: Message, now: float) -> None:
        """A message from a worker's socket (or its heartbeat socket, ``<id>.hb``)."""
        worker = self.workforce.worker(identity.decode("ascii", "replace").removesuffix(".hb"))
        if worker is None:
            return
        if msg.type in (MsgType.HEARTBEAT, MsgType.READY, MsgType.LOAD_FAILED):
            self.workforce.on_message(worker, msg, now)
        elif msg.type in (MsgType.SEGMENT, MsgType.PARTIAL, MsgType.EVENT, MsgType.HEARD):
            job = self.jobs.get(msg.id)
            if job is not None and job.worker == worker.id and job.owner:
                self.pieces.on_segment(job, msg.body, now)
            elif job is not None and job.worker == worker.id:
                if job.kind is JobKind.SESSION:
                    self.sessions.heard(job, msg)
                self._reply(job, msg.type, msg.body)
        elif msg.type in (MsgType.RESULT, MsgType.ERROR) and (msg.id in worker.jobs or msg.id in worker.sessions):
            self.on_answer(worker, msg, now)
        elif msg.type is MsgType.BATCH:
            self._batched(worker, msg, now)

    def tick(self, now: float, sample: bool) -> None:
        """Reap, kill the overdue, watch heartbeats and deadlines, expire queued jobs, check health, roll, scale."""
        if sample:
            self.workforce.read_cards()
        for name, pool in list(self.pools.items()):
            for worker in list(pool.workers.values()):
                if sample:
                    self.workforce.sample(pool, worker)
                if self.workforce.watch(pool, worker, now):
                    self._watch_jobs(worker, now)
            for job in self.jobs.expired(name, now):
                self.fail(job, _acquire_timeout(pool, job, now), now)
            self.feed(pool, now)  # a session worker's duty may have fallen enough for a waiting job
            if pool.removed:
                if self.workforce.retire(name):
                    self.jobs.drop_provider(name)
                continue
            if not self.stopping:
                self.workforce.tend(pool, now)

    def begin_shutdown(self) -> None:
        """The hub is shutting down: refuse new work; jobs in flight go on."""
        self.stopping = True

    @property
    def in_flight(self) -> int:
        """Clients' jobs and sessions not answered yet, queued or running."""
        return self.jobs.in_flight

    def views(self, now: float) -> dict[str, PoolView]:
        """Every pool as status and the metrics see it."""
        return {name: self.view(pool, now) for name, pool in self.pools.items()}

    def reconfigure(self, new: HubConfig, now: float) -> None:
        """A reloaded config: pools that stay get a new generation (a rolling restart), removed ones drain and
        their waiting jobs fail; each enabled provider's queue takes its new bound."""
        self.workforce.reconfigure(new, now)
        for provider in new.enabled_providers:
            self.jobs.add_provider(provider.name, provider.pool.max_queue)
        self.config = new

    def close(self, now: float) -> int:
        """The end of a shutdown: fail what is left, stop every worker (STOP, then SIGTERM, then SIGKILL);
        return how many there were."""
        for name in self.pools:
            for job in self.jobs.waiting(name):
                self.fail(job, ShuttingDown("the hub stopped before a worker could take this job"), now)
        for job in self.jobs.on_workers():
            self.fail(job, ShuttingDown("the hub stopped before the job finished"), now)
        return self.workforce.close()

    # --- admitting and placing -----------------------------------------------------

    def _admitted(self, client: bytes, msg: Message, now: float) -> Job:
        """The checks every new job or session passes (``hub.admission``), then the job it becomes."""
        if self.stopping:
            raise ShuttingDown("the hub is shutting down and takes no new work; retry once it is back")
        if self.jobs.of_request(client, msg.id) is not None:
            raise BadRequest(f"request id {msg.id!r} is already in flight on this connection")
        name, route = msg.body.get("provider"), ""
        routed = (
            self.rollout.resolve(name, protocol.parse_route_key(msg.body), self.unavailable())
            if isinstance(name, str)
            else None
        )
        if routed is not None:
            name, route = routed, name
        provider = admission.provider_for(self.config, self.pools, name, now)
        if msg.type is MsgType.STREAM_OPEN:
            return self.sessions.open(client, msg, provider, route, self.shm_prefix, now)
        job_id = self.jobs.new_id(JobKind.REQUEST)
        job = admission.request_job(job_id, client, msg, provider, route, self.config, self.shm_prefix, now)
        self.inline_bytes += len(msg.payload or b"")
        return job

    def unavailable(self) -> dict[str, Unavailable]:
        """The providers a route must not send to now, and why: disabled or removed, degraded (its workers fail to
        start), or without a ready worker yet."""
        out: dict[str, Unavailable] = {}
        for name, provider in self.config.providers.items():
            pool = self.pools.get(name)
            if not provider.enabled or pool is None or pool.removed:
                out[name] = Unavailable("it is disabled", failed=True)
            elif pool.load_failures:
                out[name] = Unavailable(
                    f"it is degraded ({pool.last_error or 'its workers fail to start'})", failed=True
                )
            elif not any(w.state in (WorkerState.IDLE, WorkerState.BUSY) for w in pool.workers.values()):
                out[name] = Unavailable("it has no ready worker", failed=False)
        return out

    def place(self, job: Job, now: float) -> None:
        """Give a new job a worker now (``_home``), or queue it (POOL_BUSY when the queue is full)."""
        worker = self._home(job)
        self.jobs.place(job, queued=worker is None)
        if worker is not None:
            self.start_job(job, worker, now)

    def _shadow(self, primary: Job, provider: str, now: float) -> None:
        """Send a copy of the request to the route's shadow if one of its workers is idle now and none of its
        jobs waits, else drop it: a shadow never queues, so it never stands in front of a client's job."""
        pool = self.pools.get(provider)
        room = pool is not None and not pool.removed and not self.jobs.queued(provider) and bool(pool.idle)
        shadow = (
            admission.shadow_job(self.jobs.new_id(JobKind.SHADOW), primary, provider, self.shm_prefix, now)
            if room
            else None
        )
        if pool is None or shadow is None:
            self.rollout.dropped(primary.route, provider)
            return
        self.rollout.paired(primary, shadow)
        worker = pool.take_idle()
        assert worker is not None, "a shadow placed without an idle worker"
        self.jobs.place(shadow, queued=False)
        self.start_job(shadow, worker, now)

    def _home(self, job: Job) -> WorkerHandle | None:
        """A session: the sessions' room picks (``Sessions.home``). A one-shot job: the least recently used idle
        worker, else a worker whose sessions leave it time (``hub.supervisor.assignment``)."""
        pool = self.pools[job.provider]
        if job.kind is JobKind.SESSION:
            return self.sessions.home(pool)
        idle = pool.take_idle()
        if idle is not None:
            return idle
        ready = [w for w in pool.workers.values() if w.state in (WorkerState.IDLE, WorkerState.BUSY)]
        loads = [
            WorkerLoad(w.id, len(w.sessions), len(w.jobs), w.duty, len(w.sessions - w.turns.keys())) for w in ready
        ]
        chosen = one_shot_home(loads, pool.config.pool)
        return pool.workers[chosen] if chosen is not None else None

    def _split_answered(self, job: Job, body: dict[str, Any], now: float) -> None:
        """A split request's stitched answer (``hub.supervisor.pieces``): accounted for once, to its client."""
        self._record(job, None, now, float(body["inference_ms"]) / 1000.0, str(body["text"]))
        body.update(provider=job.provider, queue_ms=(job.started_at - job.received_at) * 1000.0)
        if job.route:
            body["route"] = job.route
        self._reply(job, MsgType.RESULT, body)
        self.jobs.finish(job)

    def _split_segment(self, job: Job, body: dict[str, Any]) -> None:
        self._reply(job, MsgType.SEGMENT, body)

    # --- jobs on workers -----------------------------------------------------------

    def start_job(self, job: Job, worker: WorkerHandle, now: float) -> None:
        pool = self.pools[job.provider]
        self.jobs.start(job, worker.id)
        session = job.kind is JobKind.SESSION
        resumed = session and job.attempts > 1
        if not resumed:  # a resumed session keeps its start: max_session_seconds counts from the open
            job.started_at = now
        if job.owner:
            self.pieces.started(job, now)
        job.run_deadline = run_deadline(pool.config.pool, job, now)
        resume = self.sessions.resume(job) if resumed else None  # before the open: its body carries the resume
        self.workforce.assign(worker, job.id, session, now)
        msg_type = MsgType.STREAM_OPEN if session else MsgType.JOB
        if (error := self.workforce.send(worker.id, msg_type, job.id, job.job_body(), job.payload)) is not None:
            self.workforce.recycle(worker, f"unreachable: {error}", now)
            self.job_lost(job, WorkerCrashed(f"worker {worker.id} was unreachable"), now)
            return
        if session:
            self.sessions.started(job, worker, resume, now)

    def feed(self, pool: ProviderPool, now: float) -> None:
        """Start queued jobs, oldest first, while the oldest has a worker to go to."""
        while (job := self.jobs.next_waiting(pool.name)) is not None and (worker := self._home(job)) is not None:
            self.start_job(job, worker, now)

    def job_lost(self, job: Job, error: HubError, now: float) -> None:
        """The job's worker is gone: retry it once more where allowed, else tell the client."""
        if job.kind is JobKind.HEALTH:
            self.jobs.finish(job)
            return
        limits = self.pools[job.provider].config.pool
        waits = job.client_waits or (bool(job.owner) and self.pieces.wanted(job))
        if waits and job.attempts <= limits.retry_on_crash and not self.stopping:
            if job.kind is JobKind.SESSION:  # it moves to another worker, which resumes from the last final word
                self.sessions.moving(job, error, now)
            else:
                log.info("job %s: retrying on another worker (%s)", job.id, error.message)
            if job.owner:
                self.pieces.retrying(job)
            self.jobs.requeue(job)
            return
        self.fail(job, error, now)

    def fail(self, job: Job, error: HubError, now: float) -> None:
        """The job ends with ``error``: accounted for, told to its client if one waits, out of the table
        (a part of a split request fails its request)."""
        if job.owner:
            self.pieces.failed(job, error, now)
            return
        error.request_id = job.request_id
        self._record(job, error.code, now)
        self._reply(job, MsgType.ERROR, error.to_dict())
        self.jobs.finish(job)

    def _reply(self, job: Job, msg_type: MsgType, body: dict[str, Any]) -> None:
        """A reply about ``job`` to its client, under the client's request id; none when no client waits."""
        if job.client_waits:
            self.reply(job.client, msg_type, job.request_id, body)

    def _record(self, job: Job, code: str | None, now: float, run: float | None = None, text: str = "") -> None:
        """Account for a client's job (or a shadow) once, when its answer (or its client's give-up) is known.
        ``run`` is the worker's busy time where it differs from the time on the worker (a session's decoding,
        not its lease)."""
        if job.kind is JobKind.HEALTH or job.state is JobState.ABANDONED:
            return
        started = job.started_at or now
        if run is None:
            run = now - job.started_at if job.started_at else 0.0
        if job.kind.has_client:
            self.metrics.finished(job.provider, now, started - job.received_at, run, job.audio_seconds, code)
        if job.route:
            self.rollout.ended(job, code, run, text if code is None else "")
        log.debug(
            "job %s (request %s) %s in %.1f ms", job.id, job.request_id, code or "done", (now - job.received_at) * 1e3
        )

    def on_answer(self, worker: WorkerHandle, msg: Message, now: float) -> None:
        """A worker's final answer to its job: forward it, account for it, free or recycle the worker."""
        job = self.jobs.get(msg.id)
        if job is not None and job.worker != worker.id:
            job = None
        self.workforce.release(worker, msg.id)
        model_failed = msg.type is MsgType.ERROR and msg.body.get("code") == "INFERENCE_FAILED"
        if job is not None and job.kind is JobKind.HEALTH:
            self.jobs.finish(job)
            if not self.workforce.checked(worker, msg, now):
                return
        elif job is not None and job.owner:
            self.pieces.on_answer(job, msg, worker.id, now)
        elif job is not None:
            code = msg.body.get("code", "INFERENCE_FAILED") if msg.type is MsgType.ERROR else None
            decoding = float(msg.body.get("inference_ms", 0.0)) / 1000.0 if job.kind is JobKind.SESSION else None
            self._record(job, code, now, decoding, str(msg.body.get("text", "")))
            body = merge_result(job.finals[: job.carried], msg.body) if job.carried else dict(msg.body)
            if msg.type is MsgType.RESULT:
                body.update(
                    worker=worker.id, provider=job.provider, queue_ms=(job.started_at - job.received_at) * 1000.0
                )
                if job.route:
                    body["route"] = job.route
            else:
                body["job_id"] = job.request_id  # the wire's name for the failed request's id
            self._reply(job, msg.type, body)
            self.jobs.finish(job)
        self.workforce.tally(
            worker, counted=job is not None and job.kind is not JobKind.HEALTH, model_failed=model_failed
        )
        self.worker_free(worker, now)

    def _watch_jobs(self, worker: WorkerHandle, now: float) -> None:
        """A worker up and answering: the sessions' room watches its sessions (one whose flush overran fails, the
        worker serves on); one-shot jobs that overran their deadline fail and their worker is recycled (the other
        jobs it holds are retried elsewhere once it exits)."""
        for session, error in self.sessions.watch(worker, now):
            self.fail(session, error, now)
            self.worker_free(worker, now)
        overdue = [job for job in map(self.jobs.get, list(worker.jobs)) if job is not None and now >= job.run_deadline]
        if overdue:
            first = overdue[0]
            what = "health check" if first.kind is JobKind.HEALTH else f"job {first.id}"
            self.workforce.recycle(
                worker, f"{what} overran its {first.run_deadline - first.started_at:.0f} s deadline", now
            )
        for job in overdue:
            limit = job.run_deadline - job.started_at
            self.fail(
                job,
                JobTimeout(f"the job did not finish within its {limit:.0f} s deadline; its worker was restarted"),
                now,
            )

    def _batched(self, worker: WorkerHandle, msg: Message, now: float) -> None:
        """The worker starts decoding held jobs (or stepping live sessions) together in one forward pass: counted
        for the batch-size histogram and the status' mean batch."""
        jobs = msg.body.get("jobs")
        if not isinstance(jobs, list) or not jobs:
            return
        self.metrics.batch(worker.provider, len(jobs), now)
        log.debug("worker %s: decoding a batch of %d job(s): %s", worker.id, len(jobs), " ".join(map(str, jobs)))

    def view(self, pool: ProviderPool, now: float) -> PoolView:
        return PoolView(
            pool=pool,
            queue_depth=self.jobs.queued(pool.name),
            sessions=self.jobs.sessions(pool.name),
            pieces=self.jobs.pieces(pool.name),
            held_back=self.workforce.held_back.get(pool.name, ""),
            target_size=self.workforce.target_size(pool),
            figures=self.metrics.summary(pool.name, now, max(1, pool.size)),
            gpu_error=self.workforce.cards.error,
        )

    # --- what the workforce asks of the jobs' side (``hub.workforce.Employer``) ------

    def queued(self, provider: str) -> int:
        """How many of the provider's jobs wait for a worker."""
        return self.jobs.queued(provider)

    def worker_free(self, worker: WorkerHandle, now: float) -> None:
        """A worker finished its job (or its start): give it the next job, or let it go if it is due to."""
        pool = self.pools[worker.provider]
        if worker.jobs or worker.sessions:  # still holding jobs or serving sessions: busy, though a job may fit
            if worker.state is WorkerState.BUSY:
                self.feed(pool, now)
        elif self.workforce.free(worker, now):
            self.feed(pool, now)

    def worker_lost(self, worker: WorkerHandle, error: HubError, now: float) -> None:
        """The worker is gone or going: its jobs and every session it served are lost (retried where allowed; each
        retry goes to the front of the queue, so the newest goes first and the oldest ends up in front)."""
        for job in [self.jobs.get(job_id) for job_id in reversed(self.workforce.unassign_all(worker))]:
            if job is not None and job.worker == worker.id:  # not one that has since moved to another worker
                self.job_lost(job, error, now)

    def provider_down(self, provider: str, reason: str, now: float) -> None:
        """The provider can take no job now: every job waiting for it fails."""
        for job in self.jobs.waiting(provider):
            self.fail(job, ProviderUnavailable(reason), now)

    def health_check(self, worker: WorkerHandle, now: float) -> None:
        """Run the bundled clip on an idle worker the workforce took from its pool's idle queue."""
        job = health_job(self.jobs.new_id(JobKind.HEALTH), worker.provider, now)
        self.jobs.place(job, queued=False)
        self.start_job(job, worker, now)


def _acquire_timeout(pool: ProviderPool, job: Job, now: float) -> AcquireTimeout:
    """The error of a job that waited its whole ``acquire_timeout`` in the queue, with what the pool was doing."""
    counts = pool.counts()
    return AcquireTimeout(
        f"no {job.provider} worker became free within {now - job.received_at:.1f} s "
        f"({counts[WorkerState.BUSY]} busy, {counts[WorkerState.STARTING]} starting, "
        f"max_size {pool.config.pool.max_size}); retry, or raise pool.max_size"
    )
