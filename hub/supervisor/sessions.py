"""Live sessions: the room that keeps their state while workers come and go.

A session is a job of kind SESSION in the shared ``Jobs`` table; the farm admits and places it like any job
(``Farm.admit``, ``Farm.place``) and asks this room for what only sessions have: which worker may take one more
(``home``: by session load, ``hub.supervisor.assignment``), the client's audio and close (``data``, ``close``),
what a resume needs of each event on its way to the client (``heard``), how a session moves to another worker
when its worker dies (``moving``; ``resume`` sets what the new worker's STREAM_OPEN carries, and ``started``
hands it the audio from the last final word), and
the watch over idle, overlong or stuck sessions (``watch``). Time is the ``now`` it is given; messages to workers
go through the workforce.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from hub import protocol
from hub.config import PoolConfig, ProviderConfig
from hub.errors import BadRequest, HubError, JobTimeout
from hub.protocol import Message, MsgType, Resume
from hub.resume import context
from hub.supervisor import admission
from hub.supervisor.assignment import WorkerLoad, session_home
from hub.supervisor.jobs import Job, JobKind, Jobs, session_overdue
from hub.supervisor.metrics import Metrics
from hub.supervisor.pool import ProviderPool, WorkerHandle, WorkerState
from hub.supervisor.workforce import Workforce

log = logging.getLogger("hub.supervisor")

CLIENT_CLOSE = "closed by the client"  # a session's ``close_reason`` when its client closed it (no reason to send)

Reply = Callable[[bytes, MsgType, str, dict[str, Any]], None]
StreamData = tuple[dict[str, Any], bytes | None]  # a STREAM_DATA's body and payload


class Sessions:
    """Every live session's keeping: open, audio, close, resume and watch."""

    def __init__(self, jobs: Jobs, workforce: Workforce, reply: Reply, metrics: Metrics) -> None:
        self.jobs = jobs
        self.workforce = workforce
        self.reply = reply
        self.metrics = metrics
        self.inline_bytes = 0  # PCM bytes of live sessions that crossed the supervisor (clients without shared memory)

    def open(
        self, client: bytes, msg: Message, provider: ProviderConfig, route: str, shm_prefix: str, now: float
    ) -> Job:
        """A STREAM_OPEN that passed admission: the session job, if the provider has room for one more."""
        admission.check_session_room(provider, self.jobs.sessions(provider.name))
        job_id = self.jobs.new_id(JobKind.SESSION)
        return admission.session_job(job_id, client, msg, provider, route, shm_prefix, now)

    def home(self, pool: ProviderPool) -> WorkerHandle | None:
        """The ready worker with the least session load and room for one more, or None."""
        ready = [w for w in pool.workers.values() if w.state in (WorkerState.IDLE, WorkerState.BUSY)]
        loads = [
            WorkerLoad(w.id, len(w.sessions), len(w.jobs), w.duty, len(w.sessions - w.turns.keys())) for w in ready
        ]
        chosen = session_home(loads, pool.config.pool.sessions_per_worker)
        return pool.workers[chosen] if chosen is not None else None

    def _limits(self, job: Job) -> PoolConfig:
        return self.workforce.pools[job.provider].config.pool

    # --- the client's side ----------------------------------------------------------

    def data(self, client: bytes, msg: Message, now: float) -> None:
        """A client's STREAM_DATA: a chunk (inline) or a ring position, counted, kept for a resume where inline,
        forwarded to the session's worker (while the session moves to another worker, the resume carries it)."""
        job = self._of(client, msg.id)
        position = protocol.parse_stream_data(msg.body, msg.payload)
        if msg.payload is not None:
            self.inline_bytes += len(msg.payload)
            job.streamed += position
            if job.tail is not None:
                job.tail.append(msg.payload, job.keep)
        else:
            job.streamed = position
        job.last_activity = now
        if job.worker is not None:
            self._to_worker(job, MsgType.STREAM_DATA, msg.body, msg.payload)

    def close(self, client: bytes, request_id: str, now: float) -> None:
        """A client's STREAM_CLOSE: its session flushes and answers."""
        self.close_session(self._of(client, request_id), "", now)

    def close_session(self, job: Job, reason: str, now: float) -> None:
        """Ask the worker to flush and answer; a client's close has no reason, the hub's says why."""
        if job.close_reason:
            return
        job.close_reason = reason or CLIENT_CLOSE
        if reason:
            log.info("session %s: closing, %s", job.id, reason)
        if job.worker is not None:  # else the worker that takes the session over is told (``started``)
            self._send_close(job, now)

    def close_all(self, reason: str, now: float) -> None:
        """Close every live session (the hub is shutting down): each worker decodes what its sessions hold and
        answers, so their clients get every final and the reason within the drain, instead of a session that
        keeps the hub waiting until its client leaves or its idle timeout passes."""
        for job in self.jobs.live_sessions():
            self.close_session(job, reason, now)

    def _of(self, client: bytes, request_id: str) -> Job:
        job = self.jobs.of_request(client, request_id)
        if job is None or job.kind is not JobKind.SESSION:
            raise BadRequest(f"no live session {request_id!r} on this connection")
        if job.attempts == 0:
            raise BadRequest(f"session {request_id!r} has no worker yet; wait for the open to be answered")
        return job

    def _send_close(self, job: Job, now: float) -> None:
        job.run_deadline = now + self._limits(job).job_timeout
        reason = "" if job.close_reason == CLIENT_CLOSE else job.close_reason
        self.jobs.close(job)
        self._to_worker(job, MsgType.STREAM_CLOSE, {"reason": reason} if reason else {}, None)

    def _to_worker(self, job: Job, msg_type: MsgType, body: dict[str, Any], payload: bytes | None) -> None:
        """A message about a session to the worker serving it; when that worker is gone, reaping it moves the session."""
        self.workforce.send(job.worker or "", msg_type, job.id, body, payload)

    # --- the worker's side ----------------------------------------------------------

    def heard(self, job: Job, msg: Message) -> None:
        """A session's PARTIAL, SEGMENT, EVENT or HEARD on its way to the client: what a resume needs of it."""
        job.keep = int(msg.body.get("keep", job.keep))
        if msg.type is MsgType.SEGMENT:
            job.finals.append({k: v for k, v in msg.body.items() if k not in ("read", "keep")})

    def started(self, job: Job, worker: WorkerHandle, resume: StreamData | None, now: float) -> None:
        """The worker has the STREAM_OPEN: a resumed session gets the audio from the last final word (and its
        close, if the client closed meanwhile); the client learns which worker serves it."""
        if resume is not None:
            self._to_worker(job, MsgType.STREAM_DATA, *resume)
            if job.close_reason:
                self._send_close(job, now)
        job.last_activity = now
        self.reply(
            job.client,
            MsgType.REPLY,
            job.request_id,
            {"session": job.id, "worker": worker.id, "resumed": job.attempts - 1},
        )

    def resume(self, job: Job) -> StreamData:
        """Set the ``resume`` of a session taking over from a worker that died: it starts at the dead worker's
        ``keep`` (or the oldest sample the supervisor kept of an inline session); returns the STREAM_DATA
        that hands the new worker the audio from there on."""
        start, payload = job.tail.since(job.keep) if job.tail is not None else (job.keep, None)
        job.resume = Resume(start=start, finals=tuple(context(job.finals, start / protocol.SAMPLE_RATE)))
        job.carried = len(job.finals)
        log.info(
            "session %s: resumed on %s from %.2f s (attempt %d)",
            job.id,
            job.worker,
            start / protocol.SAMPLE_RATE,
            job.attempts,
        )
        return ({}, payload) if payload is not None else ({"end": job.streamed}, None)

    def moving(self, job: Job, error: HubError, now: float) -> None:
        """The session's worker died and a retry is allowed: it waits for another worker, which resumes it."""
        log.warning("session %s: %s; moving it to another worker", job.id, error.message)
        job.acquire_deadline = now + self._limits(job).acquire_timeout
        self.metrics.resumed(job.provider)

    def watch(self, worker: WorkerHandle, now: float) -> list[tuple[Job, HubError]]:
        """Close the worker's sessions idle or open too long; return those whose flush overran (to fail; the
        worker serves on)."""
        overran: list[tuple[Job, HubError]] = []
        for job in [self.jobs.get(s) for s in list(worker.sessions)]:
            if job is None:
                continue
            limits = self._limits(job)
            if not job.close_reason and (why := session_overdue(limits, job, now)):
                self.close_session(job, why, now)
            elif job.close_reason and now >= job.run_deadline:
                self.workforce.release(worker, job.id)
                overran.append(
                    (job, JobTimeout(f"the session did not flush within {limits.job_timeout:.0f} s (pool.job_timeout)"))
                )
        return overran
