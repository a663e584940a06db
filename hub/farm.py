"""The farm: the jobs on the pools' workers.

It admits new work (``admit``: the checks of ``hub.admission``, then a job), places jobs on
the least recently used idle worker or in the provider's bounded queue, feeds queued jobs to
workers as they come free, forwards their answers, keeps live sessions (and resumes them on
another worker), enforces deadlines, retries or fails what a lost worker leaves. Every job is
in the ``Jobs`` table of ``hub.dispatch``, the only place its state changes. The workers
themselves (spawn, readiness, health checks, scaling, rolling restarts, exits) are the
``Workforce``'s of ``hub.workforce``, which sends every message to a worker and asks the farm,
its ``Employer``, only what the jobs' side knows. Clients are answered through the ``reply``
callable. Reading sockets, signals and timers are the supervisor's; it calls only the public
methods of the first section below.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

from hub import admission, protocol, status
from hub.config import HubConfig
from hub.dispatch import Job, JobKind, Jobs, JobState, health_job, run_deadline, session_overdue
from hub.errors import (
    AcquireTimeout,
    BadRequest,
    HubError,
    JobTimeout,
    ProviderUnavailable,
    ShuttingDown,
    WorkerCrashed,
)
from hub.metrics import Metrics
from hub.placement import WorkerLoad, one_shot_home, session_home
from hub.pool import ProviderPool, WorkerHandle, WorkerState
from hub.protocol import Message, MsgType, Resume
from hub.resume import context, merge_result
from hub.rollout import Rollout
from hub.workforce import Workforce

log = logging.getLogger("hub.supervisor")

CLIENT_CLOSE = "closed by the client"  # a session's ``close_reason`` when its client closed it (no reason to send)

Reply = Callable[[bytes, MsgType, str, dict[str, Any]], None]


class Farm:
    """Every job in flight on the workforce's pools, behind the small surface the supervisor calls."""

    def __init__(
        self,
        config: HubConfig,
        backend: zmq.Socket,
        backend_path: Path,
        shm_prefix: str,
        reply: Reply,
        metrics: Metrics,
        rollout: Rollout,
    ) -> None:
        self.config = config
        self.shm_prefix = shm_prefix
        self.reply = reply
        self.metrics = metrics
        self.jobs = Jobs()  # every job in flight, and the providers' queues
        for provider in config.enabled_providers:
            self.jobs.add_provider(provider.name, provider.pool.max_queue)
        self.workforce = Workforce(config, backend, backend_path, shm_prefix, self)  # the pools and their workers
        self.stopping = False  # the hub is shutting down: no new job, no health check, no scaling
        self.rollout = rollout  # routes: which provider a routed request goes to, shadows, the end of every routed job
        self.inline_bytes = 0  # PCM bytes that crossed the supervisor (only clients without shared memory)

    @property
    def pools(self) -> dict[str, ProviderPool]:
        """The workforce's pools, by provider name."""
        return self.workforce.pools

    # --- what the supervisor calls -------------------------------------------------

    def admit(self, client: bytes, msg: Message) -> None:
        """Turn a client's TRANSCRIBE or STREAM_OPEN into a job and place it, or raise the error that refuses it."""
        try:
            job = self._admitted(client, msg, time.monotonic())
            if job.kind is JobKind.SESSION:
                log.info("session %s: opened by request %s for %s", job.id, msg.id, job.provider)
            else:
                log.debug("job %s: request %s for %s, %.2f s of audio", job.id, msg.id, job.provider, job.audio.seconds)
            self.place(job, job.received_at)
        except HubError as exc:
            name = msg.body.get("provider") or self.config.enabled_providers[0].name
            known = isinstance(name, str) and name in self.config.providers
            self.metrics.rejected(name if known else "_unknown", exc.code)
            log.debug("request %s refused: %s", msg.id, exc)
            raise
        shadow = self.rollout.shadow_for(job.route) if job.route and job.kind is JobKind.REQUEST else None
        if shadow is not None:
            self._shadow(job, shadow)

    def stream_data(self, client: bytes, msg: Message) -> None:
        """A client's STREAM_DATA: a chunk (inline) or a ring position for its live session."""
        job = self._session(client, msg.id)
        position = protocol.parse_stream_data(msg.body, msg.payload)
        if msg.payload is not None:
            self.inline_bytes += len(msg.payload)
        self.session_data(job, msg.body, msg.payload, position)

    def stream_close(self, client: bytes, request_id: str) -> None:
        """A client's STREAM_CLOSE: its session flushes and answers."""
        self.close_session(self._session(client, request_id), "")

    def cancel(self, client: bytes, request_id: str) -> None:
        """The client gave up (its timeout): a queued job is dropped; one on a worker is abandoned there (it
        finishes, a session flushes) and its answer goes nowhere."""
        job = self.jobs.of_request(client, request_id)
        if job is None:
            return
        self._record(job, "JOB_TIMEOUT", time.monotonic())
        if job.state is JobState.QUEUED:
            self.jobs.finish(job)
            return
        if job.kind is JobKind.SESSION:
            self.close_session(job, "the client went away")
        self.jobs.abandon(job)

    def on_worker(self, identity: bytes, msg: Message) -> None:
        """A message from a worker's socket (or its heartbeat socket, ``<id>.hb``)."""
        now = time.monotonic()
        worker = self.workforce.worker(identity.decode("ascii", "replace").removesuffix(".hb"))
        if worker is None:
            return
        if msg.type in (MsgType.HEARTBEAT, MsgType.READY, MsgType.LOAD_FAILED):
            self.workforce.on_message(worker, msg, now)
        elif msg.type in (MsgType.SEGMENT, MsgType.PARTIAL, MsgType.EVENT, MsgType.HEARD):
            job = self.jobs.get(msg.id)
            if job is not None and job.worker == worker.id:
                if job.kind is JobKind.SESSION:
                    self._heard(job, msg)
                self._reply(job, msg.type, msg.body)
        elif msg.type in (MsgType.RESULT, MsgType.ERROR) and (worker.job == msg.id or msg.id in worker.sessions):
            self.on_answer(worker, msg, now)

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
                self.fail(job, _acquire_timeout(pool, job, now))
            self.feed(pool, now)  # a session worker's duty may have fallen enough for a waiting job
            if pool.removed:
                if self.workforce.retire(name):
                    self.jobs.drop_provider(name)
                continue
            if not self.stopping:
                self.workforce.tend(pool, now)

    def scale(self, name: object, size: object) -> dict[str, Any]:
        """An operator's SCALE: the pool's new size, within its ``min_size`` and ``max_size``; returns the reply."""
        return self.workforce.scale(name, size)

    def step_sizes(self, step: int) -> None:
        """SIGTTIN / SIGTTOU: one worker more (or fewer) than each pool's target, within its bounds."""
        self.workforce.step_sizes(step)

    def begin_shutdown(self) -> None:
        """The hub is shutting down: refuse new work; jobs in flight go on."""
        self.stopping = True

    @property
    def in_flight(self) -> int:
        """Clients' jobs and sessions not answered yet, queued or running."""
        return self.jobs.in_flight

    @property
    def ready(self) -> bool:
        """Every enabled provider has its ``min_size`` workers ready."""
        return self.workforce.ready

    def views(self, now: float) -> dict[str, status.PoolView]:
        """Every pool as status and the metrics see it."""
        return {name: self.view(pool, now) for name, pool in self.pools.items()}

    def sizes(self) -> dict[str, int]:
        """Live workers of each pool."""
        return {name: pool.size for name, pool in self.pools.items()}

    def reconfigure(self, new: HubConfig, now: float) -> None:
        """A reloaded config: pools that stay get a new generation (a rolling restart), removed ones drain and
        their waiting jobs fail; each enabled provider's queue takes its new bound."""
        self.workforce.reconfigure(new, now)
        for provider in new.enabled_providers:
            self.jobs.add_provider(provider.name, provider.pool.max_queue)
        self.config = new

    def close(self) -> int:
        """The end of a shutdown: fail what is left, stop every worker (STOP, then SIGTERM, then SIGKILL);
        return how many there were."""
        for name in self.pools:
            for job in self.jobs.waiting(name):
                self.fail(job, ShuttingDown("the hub stopped before a worker could take this job"))
        for job in self.jobs.on_workers():
            self.fail(job, ShuttingDown("the hub stopped before the job finished"))
        return self.workforce.close()

    # --- admitting and placing -----------------------------------------------------

    def _admitted(self, client: bytes, msg: Message, now: float) -> Job:
        """The checks every new job or session passes (``hub.admission``), then the job it becomes."""
        if self.stopping:
            raise ShuttingDown("the hub is shutting down and takes no new work; retry once it is back")
        if self.jobs.of_request(client, msg.id) is not None:
            raise BadRequest(f"request id {msg.id!r} is already in flight on this connection")
        name, route = msg.body.get("provider"), ""
        routed = self.rollout.resolve(name, protocol.parse_route_key(msg.body)) if isinstance(name, str) else None
        if routed is not None:
            name, route = routed, name
        provider = admission.provider_for(self.config, self.pools, name, now)
        if msg.type is MsgType.STREAM_OPEN:
            admission.check_session_room(provider, self.jobs.sessions(provider.name))
            job_id = self.jobs.new_id(JobKind.SESSION)
            return admission.session_job(job_id, client, msg, provider, route, self.shm_prefix, now)
        job_id = self.jobs.new_id(JobKind.REQUEST)
        job = admission.request_job(job_id, client, msg, provider, route, self.config, self.shm_prefix, now)
        self.inline_bytes += len(msg.payload or b"")
        return job

    def _session(self, client: bytes, request_id: str) -> Job:
        job = self.jobs.of_request(client, request_id)
        if job is None or job.kind is not JobKind.SESSION:
            raise BadRequest(f"no live session {request_id!r} on this connection")
        if job.attempts == 0:
            raise BadRequest(f"session {request_id!r} has no worker yet; wait for the open to be answered")
        return job

    def place(self, job: Job, now: float) -> None:
        """Give a new job a worker now (``_home``), or queue it (POOL_BUSY when the queue is full)."""
        worker = self._home(job)
        self.jobs.place(job, queued=worker is None)
        if worker is not None:
            self.start_job(job, worker, now)

    def _shadow(self, primary: Job, provider: str) -> None:
        """Send a copy of the request to the route's shadow if one of its workers is idle now and none of its
        jobs waits, else drop it: a shadow never queues, so it never stands in front of a client's job."""
        pool = self.pools.get(provider)
        room = pool is not None and not pool.removed and not self.jobs.queued(provider) and bool(pool.idle)
        now = time.monotonic()
        shadow = admission.shadow_job(self.jobs.new_id(JobKind.SHADOW), primary, provider, self.shm_prefix, now) if room else None
        if pool is None or shadow is None:
            self.rollout.dropped(primary.route, provider)
            return
        self.rollout.paired(primary, shadow)
        worker = pool.take_idle()
        assert worker is not None, "a shadow placed without an idle worker"
        self.jobs.place(shadow, queued=False)
        self.start_job(shadow, worker, now)

    def _home(self, job: Job) -> WorkerHandle | None:
        """A session: the ready worker with the least session load and room for one more. A one-shot job:
        the least recently used idle worker, else a worker whose sessions leave it time (``hub.placement``)."""
        pool = self.pools[job.provider]
        if job.kind is not JobKind.SESSION:
            idle = pool.take_idle()
            if idle is not None:
                return idle
        ready = [w for w in pool.workers.values() if w.state in (WorkerState.IDLE, WorkerState.BUSY)]
        loads = [WorkerLoad(w.id, len(w.sessions), w.job is not None, w.duty, len(w.sessions - w.turns.keys())) for w in ready]
        if job.kind is JobKind.SESSION:
            chosen = session_home(loads, pool.config.pool.sessions_per_worker)
        else:
            chosen = one_shot_home(loads, pool.config.pool)
        return pool.workers[chosen] if chosen is not None else None

    def close_session(self, job: Job, reason: str) -> None:
        """Ask the worker to flush and answer; a client's close has no reason, the hub's says why."""
        if job.close_reason:
            return
        job.close_reason = reason or CLIENT_CLOSE
        if reason:
            log.info("session %s: closing, %s", job.id, reason)
        if job.worker is not None:  # else the worker that takes the session over is told (``start_job``)
            self._send_close(job, time.monotonic())

    def _send_close(self, job: Job, now: float) -> None:
        job.run_deadline = now + self.pools[job.provider].config.pool.job_timeout
        reason = "" if job.close_reason == CLIENT_CLOSE else job.close_reason
        self.jobs.close(job)
        self._to_worker(job, MsgType.STREAM_CLOSE, {"reason": reason} if reason else {}, None)

    def session_data(self, job: Job, body: dict[str, Any], payload: bytes | None, position: int) -> None:
        """A client's chunk (inline) or ring position: counted, kept for a resume where inline, forwarded
        to the session's worker (while the session moves to another worker, the resume carries it)."""
        if payload is not None:
            job.streamed += position
            if job.tail is not None:
                job.tail.append(payload, job.keep)
        else:
            job.streamed = position
        job.last_activity = time.monotonic()
        if job.worker is not None:
            self._to_worker(job, MsgType.STREAM_DATA, body, payload)

    def _heard(self, job: Job, msg: Message) -> None:
        """A session's PARTIAL, SEGMENT, EVENT or HEARD on its way to the client: what a resume needs of it."""
        job.keep = int(msg.body.get("keep", job.keep))
        if msg.type is MsgType.SEGMENT:
            job.finals.append({k: v for k, v in msg.body.items() if k not in ("read", "keep")})

    def _to_worker(self, job: Job, msg_type: MsgType, body: dict[str, Any], payload: bytes | None) -> None:
        """A message about a job to the worker running it; when that worker is gone, reaping it fails the job."""
        self.workforce.send(job.worker or "", msg_type, job.id, body, payload)

    # --- jobs on workers -----------------------------------------------------------

    def start_job(self, job: Job, worker: WorkerHandle, now: float) -> None:
        pool = self.pools[job.provider]
        self.jobs.start(job, worker.id)
        session = job.kind is JobKind.SESSION
        resumed = session and job.attempts > 1
        if not resumed:  # a resumed session keeps its start: max_session_seconds counts from the open
            job.started_at = now
        job.run_deadline = run_deadline(pool.config.pool, job, now)
        resume_data = self._resume(job) if resumed else None
        if session:
            worker.sessions.add(job.id)
        else:
            worker.job = job.id
        pool.set_state(worker, WorkerState.BUSY, now)
        msg_type = MsgType.STREAM_OPEN if session else MsgType.JOB
        if (error := self.workforce.send(worker.id, msg_type, job.id, job.job_body(), job.payload)) is not None:
            self.workforce.recycle(worker, f"unreachable: {error}", now)
            self.job_lost(job, WorkerCrashed(f"worker {worker.id} was unreachable"))
            return
        if resume_data is not None:
            self._to_worker(job, MsgType.STREAM_DATA, *resume_data)
            if job.close_reason:
                self._send_close(job, now)
        if session:
            job.last_activity = now
            self._reply(job, MsgType.REPLY, {"session": job.id, "worker": worker.id, "resumed": job.attempts - 1})

    def _resume(self, job: Job) -> tuple[dict[str, Any], bytes | None]:
        """Set the ``resume`` of a session taking over from a worker that died: it starts at the dead worker's
        ``keep`` (or the oldest sample the supervisor kept of an inline session); returns the STREAM_DATA
        that hands the new worker the audio from there on."""
        start, payload = job.tail.since(job.keep) if job.tail is not None else (job.keep, None)
        job.resume = Resume(start=start, finals=tuple(context(job.finals, start / protocol.SAMPLE_RATE)))
        job.carried = len(job.finals)
        log.info("session %s: resumed on %s from %.2f s (attempt %d)", job.id, job.worker, start / protocol.SAMPLE_RATE, job.attempts)
        return ({}, payload) if payload is not None else ({"end": job.streamed}, None)

    def feed(self, pool: ProviderPool, now: float) -> None:
        """Start queued jobs, oldest first, while the oldest has a worker to go to."""
        while (job := self.jobs.next_waiting(pool.name)) is not None and (worker := self._home(job)) is not None:
            self.start_job(job, worker, now)

    def job_lost(self, job: Job, error: HubError) -> None:
        """The job's worker is gone: retry it once more where allowed, else tell the client."""
        if job.kind is JobKind.HEALTH:
            self.jobs.finish(job)
            return
        limits = self.pools[job.provider].config.pool
        if job.client_waits and job.attempts <= limits.retry_on_crash and not self.stopping:
            if job.kind is JobKind.SESSION:  # it moves to another worker, which resumes from the last final word
                log.warning("session %s: %s; moving it to another worker", job.id, error.message)
                job.acquire_deadline = time.monotonic() + limits.acquire_timeout
                self.metrics.resumed(job.provider)
            else:
                log.info("job %s: retrying on another worker (%s)", job.id, error.message)
            self.jobs.requeue(job)
            return
        self.fail(job, error)

    def fail(self, job: Job, error: HubError) -> None:
        """The job ends with ``error``: accounted for, told to its client if one waits, out of the table."""
        error.request_id = job.request_id
        self._record(job, error.code, time.monotonic())
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
        log.debug("job %s (request %s) %s in %.1f ms", job.id, job.request_id, code or "done", (now - job.received_at) * 1e3)

    def on_answer(self, worker: WorkerHandle, msg: Message, now: float) -> None:
        """A worker's final answer to its job: forward it, account for it, free or recycle the worker."""
        job = self.jobs.get(msg.id)
        if job is not None and job.worker != worker.id:
            job = None
        if msg.id in worker.sessions:
            worker.sessions.discard(msg.id)
        else:
            worker.job = None
        model_failed = msg.type is MsgType.ERROR and msg.body.get("code") == "INFERENCE_FAILED"
        if job is not None and job.kind is JobKind.HEALTH:
            self.jobs.finish(job)
            if not self.workforce.checked(worker, msg, now):
                return
        elif job is not None:
            code = msg.body.get("code", "INFERENCE_FAILED") if msg.type is MsgType.ERROR else None
            decoding = float(msg.body.get("inference_ms", 0.0)) / 1000.0 if job.kind is JobKind.SESSION else None
            self._record(job, code, now, decoding, str(msg.body.get("text", "")))
            worker.jobs_done += 1
            body = merge_result(job.finals[: job.carried], msg.body) if job.carried else dict(msg.body)
            if msg.type is MsgType.RESULT:
                body.update(worker=worker.id, provider=job.provider, queue_ms=(job.started_at - job.received_at) * 1000.0)
                if job.route:
                    body["route"] = job.route
            else:
                body["job_id"] = job.request_id  # the wire's name for the failed request's id
            self._reply(job, msg.type, body)
            self.jobs.finish(job)
        worker.consecutive_failures = worker.consecutive_failures + 1 if model_failed else 0
        self.worker_free(worker, now)

    def _watch_jobs(self, worker: WorkerHandle, now: float) -> None:
        """A worker up and answering: watch its sessions; one whose job overran its deadline is recycled."""
        job = self.jobs.get(worker.job or "")
        for session in [self.jobs.get(s) for s in list(worker.sessions)]:
            if session is not None:
                self._watch_session(worker, session, now)
        if job is not None and now >= job.run_deadline:
            limit = job.run_deadline - job.started_at
            what = "health check" if job.kind is JobKind.HEALTH else f"job {job.id}"
            self.workforce.recycle(worker, f"{what} overran its {limit:.0f} s deadline", now)
            self.fail(job, JobTimeout(f"the job did not finish within its {limit:.0f} s deadline; its worker was restarted"))

    def _watch_session(self, worker: WorkerHandle, job: Job, now: float) -> None:
        """Close a session idle or open too long; fail one whose flush overran (its worker serves on)."""
        if not job.close_reason and (why := session_overdue(self.pools[job.provider].config.pool, job, now)):
            self.close_session(job, why)
        elif job.close_reason and now >= job.run_deadline:
            worker.sessions.discard(job.id)
            limit = self.pools[job.provider].config.pool.job_timeout
            self.fail(job, JobTimeout(f"the session did not flush within {limit:.0f} s (pool.job_timeout)"))
            self.worker_free(worker, now)

    def view(self, pool: ProviderPool, now: float) -> status.PoolView:
        return status.PoolView(
            pool=pool,
            queue_depth=self.jobs.queued(pool.name),
            sessions=self.jobs.sessions(pool.name),
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
        if worker.job is not None or worker.sessions:  # still serving sessions: busy, though a job may fit
            if worker.state is WorkerState.BUSY:
                self.feed(pool, now)
        elif self.workforce.free(worker, now):
            self.feed(pool, now)

    def worker_lost(self, worker: WorkerHandle, error: HubError) -> None:
        """The worker is gone or going: its job and every session it served are lost (retried where allowed)."""
        lost = [self.jobs.get(job_id) for job_id in [worker.job or "", *worker.sessions]]
        worker.job = None
        worker.sessions.clear()
        for job in lost:
            if job is not None and job.worker == worker.id:  # not one that has since moved to another worker
                self.job_lost(job, error)

    def provider_down(self, provider: str, reason: str) -> None:
        """The provider can take no job now: every job waiting for it fails."""
        for job in self.jobs.waiting(provider):
            self.fail(job, ProviderUnavailable(reason))

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
