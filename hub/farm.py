"""The farm: pools of worker processes and the jobs on them.

It admits new work (``admit``: the checks of ``hub.admission``, then a job), places jobs on
the least recently used idle worker or in the provider's bounded queue, starts, watches,
recycles and drains workers (on the card ``hub.cards`` picks), enforces deadlines, runs health
checks, rolling restarts and the scaling decision of ``hub.policy``. Every job is in the
``Jobs`` table of ``hub.dispatch``, the only place its state changes. Every message to a
worker is built in ``_send``; clients are answered through the ``reply`` callable. Reading
sockets, signals and timers are the supervisor's; it calls only the public methods of the
first section below.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

from hub import admission, process, protocol, status
from hub.cards import Cards
from hub.config import HubConfig
from hub.dispatch import Job, JobKind, Jobs, JobState, health_job, run_deadline
from hub.errors import (
    AcquireTimeout,
    BadRequest,
    HubError,
    JobTimeout,
    ProviderUnavailable,
    ShuttingDown,
    UnknownProvider,
    WorkerCrashed,
)
from hub.metrics import Metrics
from hub.placement import WorkerLoad, one_shot_home, session_home
from hub.policy import PoolSnapshot, decide, floor_size
from hub.pool import ProviderPool, WorkerHandle, WorkerState
from hub.protocol import ExitCode, Message, MsgType, Resume, WorkerSpec
from hub.resources import rss_mb
from hub.resume import context, merge_result
from hub.rollout import Rollout

log = logging.getLogger("hub.supervisor")

KILL_GRACE = 3.0  # seconds between SIGTERM (or STOP) and SIGKILL
CLIENT_CLOSE = "closed by the client"  # a session's ``close_reason`` when its client closed it (no reason to send)
HELD_LOG_INTERVAL = 60.0  # a pool held back under steady load says so once a minute, not on every pass

Reply = Callable[[bytes, MsgType, str, dict[str, Any]], None]


class Farm:
    """The pools, their workers and every job in flight, behind the small surface the supervisor calls."""

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
        self.backend = backend
        self.backend_path = backend_path
        self.shm_prefix = shm_prefix
        self.reply = reply
        self.metrics = metrics
        self.pools = {p.name: ProviderPool(p) for p in config.enabled_providers}
        self.jobs = Jobs()  # every job in flight, and the providers' queues
        for provider in config.enabled_providers:
            self.jobs.add_provider(provider.name, provider.pool.max_queue)
        self.cards = Cards()  # the GPUs the hub may use and their last readings
        self.held_back: dict[str, str] = {}
        self.held_logged: dict[str, float] = {}  # when each pool's held-back scaling was last logged
        self.stopping = False  # the hub is shutting down: no new job, no health check, no scaling
        self.rollout = rollout  # routes: which provider a routed request goes to, shadows, the end of every routed job
        self.inline_bytes = 0  # PCM bytes that crossed the supervisor (only clients without shared memory)

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
        worker = self._worker(identity.decode("ascii", "replace").removesuffix(".hb"))
        if worker is None:
            return
        if msg.type is MsgType.HEARTBEAT:
            busy = msg.body.get("busy")
            if isinstance(busy, (int, float)) and now > worker.last_heartbeat:
                worker.duty = max(0.0, float(busy) - worker.busy) / (now - worker.last_heartbeat)
                worker.busy = float(busy)
            worker.last_heartbeat = now
        elif msg.type is MsgType.READY:
            self.on_ready(worker, msg.body, now)
        elif msg.type is MsgType.LOAD_FAILED:
            worker.last_error = str(msg.body.get("error", "unknown error"))
        elif msg.type in (MsgType.SEGMENT, MsgType.PARTIAL):
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
            self.cards.read()
        for name, pool in list(self.pools.items()):
            for worker in list(pool.workers.values()):
                if sample:
                    worker.rss_mb = rss_mb(worker.pid)
                    self.cards.sample(pool, worker)
                self._watch(pool, worker, now)
            for job in self.jobs.expired(name, now):
                self.fail(job, self._acquire_timeout(job, now))
            self.feed(pool, now)  # a session worker's duty may have fallen enough for a waiting job
            if pool.removed:
                if not pool.workers:
                    del self.pools[name]
                    self.jobs.drop_provider(name)
                continue
            if not self.stopping:
                self._health_checks(pool, now)
                self._roll(pool, now)
                self._scale(pool, now)

    def scale(self, name: object, size: object) -> dict[str, Any]:
        """An operator's SCALE: the pool's new size, within its ``min_size`` and ``max_size``; returns the reply."""
        pool = self.pools.get(name) if isinstance(name, str) else None
        if pool is None or pool.removed:
            raise UnknownProvider(f"no enabled provider named {name!r}")
        if not isinstance(size, int) or isinstance(size, bool):
            raise BadRequest("field 'size' must be an integer")
        self.set_size(pool, size, clamp=False)
        return {"provider": pool.name, "size": size}

    def step_sizes(self, step: int) -> None:
        """SIGTTIN / SIGTTOU: one worker more (or fewer) than each pool's target, within its bounds."""
        for pool in self.pools.values():
            if not pool.removed:
                self.set_size(pool, self.target_size(pool) + step, clamp=True)

    def target_size(self, pool: ProviderPool) -> int:
        """The size the pool is heading for: its floor, raised by what the scaling policy keeps."""
        return floor_size(self._snapshot(pool), pool.config.pool)

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
        return all(
            sum(1 for w in pool.workers.values() if w.state in (WorkerState.IDLE, WorkerState.BUSY))
            >= pool.config.pool.min_size
            for pool in self.pools.values()
            if not pool.removed
        )

    def views(self, now: float) -> dict[str, status.PoolView]:
        """Every pool as status and the metrics see it."""
        return {name: self.view(pool, now) for name, pool in self.pools.items()}

    def sizes(self) -> dict[str, int]:
        """Live workers of each pool."""
        return {name: pool.size for name, pool in self.pools.items()}

    def reconfigure(self, new: HubConfig, now: float) -> None:
        """A reloaded config: pools that stay get a new generation (a rolling restart), removed ones drain."""
        for name, pool in self.pools.items():
            provider = new.providers.get(name)
            if provider is None or not provider.enabled:
                log.info("provider %s left the config: draining its workers", name)
                pool.removed = True
                for job in self.jobs.waiting(name):
                    self.fail(job, ProviderUnavailable(f"provider {name!r} was removed from the config"))
                for worker in list(pool.workers.values()):
                    self.drain(worker, now)
            else:
                pool.config = provider
                pool.removed = False
                pool.generation += 1
                pool.floor = 0
                pool.load_failures = 0
                pool.next_spawn_at = now
                self.jobs.add_provider(name, provider.pool.max_queue)
        for provider in new.enabled_providers:
            if provider.name not in self.pools:
                self.pools[provider.name] = ProviderPool(provider)
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
        workers = [w for pool in self.pools.values() for w in pool.workers.values()]
        for worker in workers:
            self._send(worker.id, MsgType.STOP, worker.id)
        _wait_all(workers, 2.0)
        for worker in workers:
            process.terminate(worker.proc)
        _wait_all(workers, KILL_GRACE)
        for worker in workers:
            process.kill(worker.proc)
        _wait_all(workers, KILL_GRACE)
        return len(workers)

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
        loads = [WorkerLoad(w.id, len(w.sessions), w.job is not None, w.duty) for w in ready]
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
        """A session's PARTIAL or SEGMENT on its way to the client: what a resume needs of it."""
        job.keep = int(msg.body.get("keep", job.keep))
        if msg.type is MsgType.SEGMENT:
            job.finals.append({k: v for k, v in msg.body.items() if k not in ("read", "keep")})

    def set_size(self, pool: ProviderPool, size: int, clamp: bool) -> None:
        """Set the pool's size at run time: the floor autoscaling keeps; extra workers retire now."""
        limits = pool.config.pool
        if clamp:
            size = min(limits.max_size, max(limits.min_size, size))
        elif not limits.min_size <= size <= limits.max_size:
            raise BadRequest(
                f"size {size} is outside [{limits.min_size}, {limits.max_size}] "
                f"(providers.{pool.name}.pool.min_size / max_size)"
            )
        pool.floor = size
        log.info("provider %s: size set to %d", pool.name, size)
        now = time.monotonic()
        extra = pool.size - size
        by_use = [pool.workers[w] for w in pool.idle] + [w for w in pool.workers.values() if w.state is not WorkerState.IDLE]
        for worker in [w for w in by_use if w.live][: max(0, extra)]:
            self.drain(worker, now)

    # --- messages to workers: all built in ``_send`` -------------------------------

    def _send(self, worker_id: str, msg_type: MsgType, msg_id: str, body: dict[str, Any] | None = None,
              payload: bytes | None = None) -> zmq.ZMQError | None:
        """Every message to a worker is built and sent here (zguide's ``send_to_worker``); returns the error
        when the worker is gone (the socket is ROUTER_MANDATORY: a dead peer raises, nothing is dropped)."""
        try:
            self.backend.send_multipart([worker_id.encode(), *protocol.build(msg_type, msg_id, body, payload)])
        except zmq.ZMQError as exc:
            return exc
        return None

    def _to_worker(self, job: Job, msg_type: MsgType, body: dict[str, Any], payload: bytes | None) -> None:
        """A message about a job to the worker running it; when that worker is gone, reaping it fails the job."""
        self._send(job.worker or "", msg_type, job.id, body, payload)

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
        if (error := self._send(worker.id, msg_type, job.id, job.job_body(), job.payload)) is not None:
            self.recycle(worker, f"unreachable: {error}", now)
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

    def worker_free(self, worker: WorkerHandle, now: float) -> None:
        """A worker finished its job (or its start): give it the next job, or let it go if it is due to."""
        pool = self.pools[worker.provider]
        limits = pool.config.pool
        if worker.job is not None or worker.sessions:  # still serving sessions: busy, though a job may fit
            if worker.state is WorkerState.BUSY:
                self.feed(pool, now)
        elif worker.state is WorkerState.DRAINING:
            self.drain(worker, now)
        elif worker.consecutive_failures >= limits.max_consecutive_failures:
            log.warning("recycling worker %s: %d failed jobs in a row", worker.id, worker.consecutive_failures)
            self.drain(worker, now)
        elif limits.max_jobs_per_worker and worker.jobs_done >= limits.max_jobs_per_worker:
            log.info("recycling worker %s after %d jobs (pool.max_jobs_per_worker)", worker.id, worker.jobs_done)
            self.drain(worker, now)
        else:
            pool.set_state(worker, WorkerState.IDLE, now)
            self.feed(pool, now)

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
            if model_failed or msg.type is MsgType.ERROR or not str(msg.body.get("text", "")).strip():
                reason = msg.body.get("message") or "no text for the test clip"
                self.recycle(worker, f"health check failed: {reason}", now)
                return
            worker.last_check = now
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

    def _worker(self, worker_id: str) -> WorkerHandle | None:
        pool = self.pools.get(worker_id.rpartition("-")[0])
        return pool.workers.get(worker_id) if pool else None

    def on_ready(self, worker: WorkerHandle, body: dict[str, Any], now: float) -> None:
        if worker.state is not WorkerState.STARTING:
            return
        pool = self.pools[worker.provider]
        worker.device = str(body.get("device", "unknown"))
        self.cards.check_ready(worker, body)
        worker.last_heartbeat = worker.last_check = now
        pool.load_failures = 0
        pool.last_error = ""
        where = worker.device if worker.card is None else f"{worker.device} on {worker.card.describe()}"
        log.info("worker %s ready (pid %d, %s) in %.2f s", worker.id, worker.pid, where, now - worker.started_at)
        old = [w for w in pool.workers.values() if w.live and w.generation < pool.generation]
        if worker.generation == pool.generation and old:
            replaced = next((w for w in old if w.state is WorkerState.IDLE), old[0])
            log.info("rolling restart of %s: %s replaces %s", pool.name, worker.id, replaced.id)
            self.drain(replaced, now)
        self.worker_free(worker, now)

    def _acquire_timeout(self, job: Job, now: float) -> AcquireTimeout:
        pool = self.pools[job.provider]
        counts = pool.counts()
        return AcquireTimeout(
            f"no {job.provider} worker became free within {now - job.received_at:.1f} s "
            f"({counts[WorkerState.BUSY]} busy, {counts[WorkerState.STARTING]} starting, "
            f"max_size {pool.config.pool.max_size}); retry, or raise pool.max_size"
        )

    def _watch(self, pool: ProviderPool, worker: WorkerHandle, now: float) -> None:
        """Reap an exited worker; kill an overdue one; recycle one that is silent, slow to start or overrunning."""
        code = worker.proc.poll()
        if code is not None:
            self.on_exit(pool, worker, code, now)
            return
        if worker.kill_at is not None:
            if now >= worker.kill_at:
                process.kill(worker.proc)
            return
        hub = self.config.hub
        job = self.jobs.get(worker.job or "")
        if worker.state is WorkerState.STARTING:
            if now - worker.started_at > hub.start_timeout:
                self.recycle(worker, f"not ready after {hub.start_timeout:.0f} s", now)
            return
        if now - worker.last_heartbeat > hub.heartbeat_timeout:
            self._lose_all(worker, WorkerCrashed(f"worker {worker.id} stopped answering"))
            self.recycle(worker, f"no heartbeat for {now - worker.last_heartbeat:.1f} s", now)
            return
        for session in [self.jobs.get(s) for s in list(worker.sessions)]:
            if session is not None:
                self._watch_session(worker, session, now)
        if job is not None and now >= job.run_deadline:
            limit = job.run_deadline - job.started_at
            what = "health check" if job.kind is JobKind.HEALTH else f"job {job.id}"
            self.recycle(worker, f"{what} overran its {limit:.0f} s deadline", now)
            self.fail(job, JobTimeout(f"the job did not finish within its {limit:.0f} s deadline; its worker was restarted"))

    def _watch_session(self, worker: WorkerHandle, job: Job, now: float) -> None:
        """Close a session idle or open too long; fail one whose flush overran (its worker serves on)."""
        if not job.close_reason and (why := self._session_overdue(job, now)):
            self.close_session(job, why)
        elif job.close_reason and now >= job.run_deadline:
            worker.sessions.discard(job.id)
            limit = self.pools[job.provider].config.pool.job_timeout
            self.fail(job, JobTimeout(f"the session did not flush within {limit:.0f} s (pool.job_timeout)"))
            self.worker_free(worker, now)

    def _lose_all(self, worker: WorkerHandle, error: HubError) -> None:
        """The worker is gone or going: its job and every session it served are lost (retried where allowed)."""
        lost = [self.jobs.get(job_id) for job_id in [worker.job or "", *worker.sessions]]
        worker.job = None
        worker.sessions.clear()
        for job in lost:
            if job is not None and job.worker == worker.id:  # not one that has since moved to another worker
                self.job_lost(job, error)

    def _session_overdue(self, job: Job, now: float) -> str:
        limits = self.pools[job.provider].config.pool
        if now - job.last_activity > limits.session_idle_timeout:
            return f"no audio for {now - job.last_activity:.0f} s (pool.session_idle_timeout={limits.session_idle_timeout:g})"
        if now - job.started_at > limits.max_session_seconds:
            return f"open longer than pool.max_session_seconds={limits.max_session_seconds:g}"
        return ""

    def _health_checks(self, pool: ProviderPool, now: float) -> None:
        """Send the bundled clip to idle workers whose last check is ``health_check_interval`` old.

        Client jobs come first: nothing is checked while jobs wait, and the last idle worker
        of a pool is checked only once the pool has been quiet for a whole interval.
        """
        interval = pool.config.pool.health_check_interval
        if self.jobs.queued(pool.name):
            return
        for worker_id in list(pool.idle):
            worker = pool.workers[worker_id]
            alone = len(pool.idle) == 1
            if now - worker.last_check < interval or (alone and now - worker.idle_since < interval):
                continue
            pool.idle.pop(worker_id)
            job = health_job(self.jobs.new_id(JobKind.HEALTH), pool.name, now)
            self.jobs.place(job, queued=False)
            self.start_job(job, worker, now)

    def _roll(self, pool: ProviderPool, now: float) -> None:
        """After a reload, start one worker of the new generation at a time; ``on_ready`` retires an old one.
        Once the new generation fills the (perhaps smaller) pool, the old workers that remain just drain."""
        old = [w for w in pool.workers.values() if w.live and w.generation < pool.generation]
        new = [w for w in pool.workers.values() if w.live and w.generation == pool.generation]
        if not old:
            return
        if len(new) >= pool.config.pool.max_size and all(w.state is not WorkerState.STARTING for w in new):
            for worker in old:
                self.drain(worker, now)
        elif not any(w.state is WorkerState.STARTING for w in new) and now >= pool.next_spawn_at:
            self.spawn(pool, now)

    def recycle(self, worker: WorkerHandle, reason: str, now: float) -> None:
        """Stop a worker that cannot be trusted: SIGTERM now, SIGKILL after a grace period."""
        log.warning("recycling worker %s (pid %d): %s", worker.id, worker.pid, reason)
        worker.last_error = reason
        self.pools[worker.provider].set_state(worker, WorkerState.UNHEALTHY, now)
        worker.job = None
        worker.kill_at = now + KILL_GRACE
        process.terminate(worker.proc)

    def drain(self, worker: WorkerHandle, now: float) -> None:
        """Stop a healthy worker politely: it takes no new job, finishes the one it has, then exits on STOP."""
        self.pools[worker.provider].set_state(worker, WorkerState.DRAINING, now)
        if worker.job is not None or worker.sessions or worker.kill_at is not None:
            return
        worker.kill_at = now + KILL_GRACE
        if self._send(worker.id, MsgType.STOP, worker.id) is not None:
            process.terminate(worker.proc)

    def on_exit(self, pool: ProviderPool, worker: WorkerHandle, code: int, now: float) -> None:
        pool.remove(worker)
        what = process.describe_exit(code)
        if code == ExitCode.MODEL_LOAD_ERROR:
            pool.load_failures += 1
            delay = process.backoff(pool.load_failures)
            pool.next_spawn_at = now + delay
            pool.last_error = worker.last_error or what
            log.error("worker %s %s: %s; next start in %.0f s", worker.id, what, pool.last_error, delay)
            if pool.size == 0:
                for job in self.jobs.waiting(pool.name):
                    self.fail(job, ProviderUnavailable(f"provider {pool.name!r} has no live worker: {pool.last_error}"))
        elif worker.state is not WorkerState.DRAINING:
            what += f" ({worker.last_error})" if worker.last_error else ""
            pool.last_error = f"worker {worker.id} {what}"
            log.warning("worker %s (pid %d) %s", worker.id, worker.pid, what)
        self._lose_all(worker, WorkerCrashed(f"worker {worker.id} {what} while running the job"))

    def _snapshot(self, pool: ProviderPool) -> PoolSnapshot:
        counts = pool.counts()
        live = [w for w in pool.workers.values() if w.live]
        return PoolSnapshot(
            sessions=sum(len(w.sessions) for w in live),
            live=len(live),
            starting=counts[WorkerState.STARTING],
            queued=self.jobs.queued(pool.name),
            idle_since=tuple((wid, pool.workers[wid].idle_since) for wid in pool.idle),
            floor=pool.floor,
            memory_mb=sum(w.rss_mb for w in live),
            worker_mb=max((w.rss_mb for w in live), default=0.0),
        )

    def _scale(self, pool: ProviderPool, now: float) -> None:
        if now < pool.next_spawn_at:
            return
        decision = decide(self._snapshot(pool), pool.config.pool, now)
        self._held(pool, decision.held_back, now)
        for worker_id in decision.retire:
            log.info("retiring worker %s of %s: idle, pool above its floor", worker_id, pool.name)
            self.drain(pool.workers[worker_id], now)
        for _ in range(decision.spawn):
            if not self.spawn(pool, now):
                break

    def _held(self, pool: ProviderPool, why: str, now: float) -> None:
        """Record why the pool does not grow (status ``held_back``), logging it at most once a minute."""
        if why and now - self.held_logged.get(pool.name, -HELD_LOG_INTERVAL) >= HELD_LOG_INTERVAL:
            log.info("scaling of %s held back: %s", pool.name, why)
            self.held_logged[pool.name] = now
        self.held_back[pool.name] = why

    def spawn(self, pool: ProviderPool, now: float) -> bool:
        """Start one worker of ``pool`` on the card placement picks; False when the GPU memory cap holds it back."""
        provider = pool.config
        placement = self.cards.place(pool, self.pools.values())
        if placement.held_back:
            self._held(pool, placement.held_back, now)
            return False
        card = placement.card
        slot, restarts = pool.take_slot()
        spec = WorkerSpec(
            id=f"{provider.name}-{pool.spawned + 1}",
            provider=provider.name,
            type=provider.type,
            model=provider.model,
            device=provider.device,
            compute_type=provider.compute_type,
            cpu_threads=provider.cpu_threads,
            backend=f"ipc://{self.backend_path}",
            shm_prefix=self.shm_prefix,
            heartbeat_interval=self.config.hub.heartbeat_interval,
            options=provider.options,
            allow_download=provider.allow_download,
            log_format=self.config.hub.log_format,
            stream=dataclasses.asdict(provider.stream),
        )
        proc = process.spawn(spec, provider, card)
        handle = WorkerHandle(spec.id, provider.name, proc, card, started_at=now, last_heartbeat=now)
        handle.generation, handle.slot, handle.restarts = pool.generation, slot, restarts
        pool.add(handle)
        log.info("started worker %s (pid %d, %s)", spec.id, proc.pid, "CPU" if card is None else card.describe())
        return True

    def view(self, pool: ProviderPool, now: float) -> status.PoolView:
        return status.PoolView(
            pool=pool,
            queue_depth=self.jobs.queued(pool.name),
            sessions=self.jobs.sessions(pool.name),
            held_back=self.held_back.get(pool.name, ""),
            target_size=floor_size(self._snapshot(pool), pool.config.pool),
            figures=self.metrics.summary(pool.name, now, max(1, pool.size)),
            gpu_error=self.cards.error,
        )


def _wait_all(workers: list[WorkerHandle], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for worker in workers:
        try:
            worker.proc.wait(max(0.0, deadline - time.monotonic()))
        except Exception:
            pass
