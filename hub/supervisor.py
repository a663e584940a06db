"""The supervisor: one poll loop that wires the frontend, the workers, the signals and the timers.

Each pass of the loop reads what the sockets have, then runs ``tick``: reap exited
workers, kill the overdue, enforce heartbeats and deadlines, expire queued jobs, run
health checks, roll restarts forward, scale, and sweep orphaned shared memory. Signal
handlers only enqueue (gunicorn's arbiter); a socketpair registered with
``signal.set_wakeup_fd`` wakes the poll.

Run it as ``python -m hub.supervisor --config config/config.sample.yaml``.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import logging
import os
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from hub import __version__, http, logs, process, protocol, shm, status
from hub.config import (
    ConfigError,
    CurveConfig,
    HubConfig,
    ProviderConfig,
    check_exposure,
    hub_id,
    load_config,
    pid_file,
)
from hub.dispatch import Job, JobQueue, acquire_deadline, health_job, run_deadline
from hub.errors import (
    AcquireTimeout,
    BadRequest,
    HubError,
    InternalError,
    InvalidAudio,
    JobTimeout,
    PoolBusy,
    ProviderUnavailable,
    ShuttingDown,
    UnknownProvider,
    WorkerCrashed,
)
from hub.metrics import Metrics
from hub.policy import PoolSnapshot, decide, floor_size
from hub.pool import ProviderPool, WorkerHandle, WorkerState
from hub.protocol import AudioRef, ExitCode, Message, MsgType, WorkerSpec
from hub.resources import Gpus, rss_mb

log = logging.getLogger("hub.supervisor")

POLL_MS = 50
KILL_GRACE = 3.0  # seconds between SIGTERM (or STOP) and SIGKILL
SHM_SWEEP_INTERVAL = 2.0
SAMPLE_INTERVAL = 1.0  # how often worker memory is read
MAX_BATCH = 256  # messages read from one socket before the loop looks at the others
_HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU)


class Supervisor:
    def __init__(self, config: HubConfig, config_path: Path | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.hub_id = hub_id(config.hub.frontend)
        self.shm_prefix = shm.hub_prefix(self.hub_id)
        self.started = time.monotonic()
        self.ctx = zmq.Context()
        self.auth: ThreadAuthenticator | None = None
        self.frontend = self._socket(zmq.ROUTER)
        # one request may carry max_audio_seconds of float32 PCM inline, plus its frames
        self.frontend.setsockopt(zmq.MAXMSGSIZE, int(config.hub.max_audio_seconds * protocol.SAMPLE_RATE * 4) + 2**20)
        if config.hub.curve.enabled:
            self._secure(config.hub.curve)
        self.frontend.bind(config.hub.frontend)
        runtime = config.resolved_runtime_dir()
        runtime.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.backend_path = runtime / f"{self.hub_id}.backend.sock"
        self.backend = self._socket(zmq.ROUTER)
        self.backend.setsockopt(zmq.ROUTER_MANDATORY, 1)  # sending to a dead worker raises, not drops
        self.backend.bind(f"ipc://{self.backend_path}")
        self.pid_path = pid_file(config)
        self.pid_path.write_text(f"{os.getpid()}\n")
        self.pools = {p.name: ProviderPool(p) for p in config.enabled_providers}
        self.queues = {p.name: JobQueue(p.pool.max_queue) for p in config.enabled_providers}
        self.gpus = Gpus()
        self.metrics = Metrics()
        self.http: Any = None
        self.next_summary = time.monotonic() + config.hub.metrics_log_interval
        self.held_back: dict[str, str] = {}
        self.running: dict[str, Job] = {}  # job id -> job on a worker
        self.requests: dict[tuple[bytes, str], Job] = {}  # (client, request id) -> queued or running job
        self.job_ids = itertools.count(1)
        self.signals: deque[int] = deque()
        self.stopping = False
        self.drain_deadline = 0.0
        self.ready_logged = False
        self.next_sweep = 0.0
        self.next_sample = 0.0
        self.dropped = 0  # replies dropped because a client stopped reading
        self.malformed = 0  # messages refused as BAD_REQUEST, or dropped when from a worker
        self.inline_bytes = 0  # PCM bytes that crossed the supervisor (only clients without shared memory)

    def _secure(self, curve: CurveConfig) -> None:
        """CURVE on the frontend: only clients whose public key is in ``allowed_clients`` get through."""
        self.auth = ThreadAuthenticator(self.ctx)
        self.auth.start()
        self.auth.configure_curve(domain="*", location=curve.allowed_clients)
        public, secret = zmq.auth.load_certificate(curve.server_secret_key)
        self.frontend.curve_secretkey = secret
        self.frontend.curve_publickey = public
        self.frontend.curve_server = True

    def _socket(self, kind: int) -> zmq.Socket:
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        return sock

    @property
    def default_provider(self) -> str:
        return self.config.enabled_providers[0].name

    # --- the loop ------------------------------------------------------------------

    def run(self) -> int:
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
        for signum in _HANDLED_SIGNALS:
            signal.signal(signum, lambda signum, _frame: self.signals.append(signum))
        poller = zmq.Poller()
        poller.register(self.frontend, zmq.POLLIN)
        poller.register(self.backend, zmq.POLLIN)
        poller.register(wake_r, zmq.POLLIN)
        log.info("supervisor %s (pid %d) listening on %s", self.hub_id, os.getpid(), self.config.hub.frontend)
        hub = self.config.hub
        if hub.metrics_port:
            self.http = http.serve(self.metrics, hub.metrics_host, hub.metrics_port)
            log.info("metrics on http://%s:%d/metrics (also /healthz, /readyz)", hub.metrics_host, hub.metrics_port)
        try:
            self.tick(time.monotonic())
            while not self._finished(time.monotonic()):
                events = dict(poller.poll(POLL_MS))
                if wake_r.fileno() in events:
                    try:
                        wake_r.recv(4096)
                    except BlockingIOError:
                        pass
                self._handle_signals()
                if self.backend in events:
                    self._drain_socket(self.backend, self.on_backend)
                if self.frontend in events:
                    self._drain_socket(self.frontend, self.on_frontend)
                self.tick(time.monotonic())
        finally:
            signal.set_wakeup_fd(-1)
            wake_r.close()
            wake_w.close()
            self.close()
        return 0

    def _drain_socket(self, sock: zmq.Socket, handler: Callable[[list[bytes]], None]) -> None:
        for _ in range(MAX_BATCH):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            handler(frames)

    def _handle_signals(self) -> None:
        while self.signals:
            signum = self.signals.popleft()
            name = signal.Signals(signum).name
            if signum == signal.SIGHUP:
                self.reload()
            elif signum in (signal.SIGTTIN, signal.SIGTTOU):
                step = 1 if signum == signal.SIGTTIN else -1
                for pool in self.pools.values():
                    if not pool.removed:
                        self.set_size(pool, floor_size(self._snapshot(pool), pool.config.pool) + step, clamp=True)
            elif self.stopping:
                log.warning("%s again: stopping now, without waiting for jobs in flight", name)
                self.drain_deadline = 0.0
            else:
                log.info("%s: draining (no new jobs; up to %.0f s for jobs in flight)", name, self.config.hub.drain_timeout)
                self.stopping = True
                self.drain_deadline = time.monotonic() + self.config.hub.drain_timeout

    def _finished(self, now: float) -> bool:
        if not self.stopping:
            return False
        return not self.requests or now >= self.drain_deadline

    # --- frontend ------------------------------------------------------------------

    def on_frontend(self, frames: list[bytes]) -> None:
        client = frames[0] if frames else b""
        request_id = "-"
        try:
            client, rest = protocol.split_identity(frames)
            request_id = protocol.peek_id(rest)
            msg = protocol.parse(rest)
            self.on_client_message(client, msg)
        except HubError as exc:
            if isinstance(exc, BadRequest):
                self.malformed += 1
            exc.job_id = request_id
            self.reply(client, MsgType.ERROR, request_id, exc.to_dict())
        except Exception:  # a bug must cost one request, never the supervisor
            log.exception("internal error while handling request %s", request_id)
            error = InternalError("the hub failed to handle this request; its log has the details", job_id=request_id)
            self.reply(client, MsgType.ERROR, request_id, error.to_dict())

    def on_client_message(self, client: bytes, msg: Message) -> None:
        if msg.type in (MsgType.TRANSCRIBE, MsgType.STREAM_OPEN):
            try:
                self.submit(client, msg) if msg.type is MsgType.TRANSCRIBE else self.open_session(client, msg)
            except HubError as exc:
                name = msg.body.get("provider") or self.default_provider
                known = isinstance(name, str) and name in self.config.providers
                self.metrics.rejected(name if known else "_unknown", exc.code)
                log.debug("request %s refused: %s", msg.id, exc)
                raise
        elif msg.type is MsgType.STATUS:
            self.reply(client, MsgType.REPLY, msg.id, self.status())
        elif msg.type is MsgType.HELLO:
            self.reply(client, MsgType.REPLY, msg.id, self.hello(msg.body))
        elif msg.type is MsgType.CANCEL:
            self.cancel(client, msg.id)
        elif msg.type is MsgType.SCALE:
            self.reply(client, MsgType.REPLY, msg.id, self.scale_request(msg.body))
        elif msg.type is MsgType.STREAM_DATA:
            self.session_data(client, msg)
        elif msg.type is MsgType.STREAM_CLOSE:
            self.close_session(self._session(client, msg.id), "")
        else:
            raise BadRequest(f"message type {msg.type.value} is not accepted from clients")

    def reply(self, client: bytes, msg_type: MsgType, request_id: str, body: dict[str, Any]) -> None:
        if not client:
            return
        try:
            self.frontend.send_multipart([client, *protocol.build(msg_type, request_id, body)], zmq.NOBLOCK)
        except zmq.Again:
            self.dropped += 1
            log.warning("client %s is not reading its replies; dropped a %s", client.hex(), msg_type.value)

    def hello(self, body: dict[str, Any]) -> dict[str, Any]:
        """Tell the client who we are and whether it shares our /dev/shm (it proves it with a probe segment)."""
        probe, nonce = body.get("probe"), body.get("nonce")
        same_host = isinstance(probe, str) and isinstance(nonce, str) and shm.check_probe(probe, nonce)
        return {
            "hub_id": self.hub_id,
            "version": __version__,
            "protocol": protocol.VERSION,
            "shm": same_host,
            "shm_prefix": self.shm_prefix,
            "providers": [p.name for p in self.config.enabled_providers],
            "default_provider": self.default_provider,
            "max_audio_seconds": self.config.hub.max_audio_seconds,
        }

    def submit(self, client: bytes, msg: Message) -> None:
        if self.stopping:
            raise ShuttingDown("the hub is shutting down and takes no new jobs; retry once it is back")
        if (client, msg.id) in self.requests:
            raise BadRequest(f"request id {msg.id!r} is already in flight on this connection")
        provider = self._provider_for(msg.body)
        audio = protocol.parse_audio_ref(
            msg.body, msg.payload, max_samples=int(self.config.hub.max_audio_seconds * protocol.SAMPLE_RATE)
        )
        if audio.shm is not None and not audio.shm.startswith(self.shm_prefix):
            raise InvalidAudio(f"shared-memory segment {audio.shm!r} is not one of this hub's ({self.shm_prefix}*)")
        if msg.payload is not None:
            self.inline_bytes += len(msg.payload)
        now = time.monotonic()
        timeout = protocol.parse_timeout(msg.body)
        job = Job(
            id=f"j{next(self.job_ids)}",
            client=client,
            request=msg.id,
            provider=provider.name,
            audio=audio,
            payload=msg.payload,
            options=protocol.parse_options(msg.body),
            stream=bool(msg.body.get("stream", False)),
            received_at=now,
            acquire_deadline=acquire_deadline(provider.pool, now, timeout),
            client_timeout=timeout,
        )
        log.debug("job %s: request %s for %s, %.2f s of audio", job.id, msg.id, provider.name, audio.seconds)
        self.place(job, now)

    def place(self, job: Job, now: float) -> None:
        """Give a new job to the least recently used idle worker, or queue it (POOL_BUSY when full)."""
        worker = self.pools[job.provider].take_idle()
        if worker is not None:
            self.start_job(job, worker, now)
        else:
            self.queues[job.provider].push(job)
        self.requests[(job.client, job.request)] = job

    # --- live sessions ---------------------------------------------------------------

    def open_session(self, client: bytes, msg: Message) -> None:
        """A live stream leases one worker until it closes; at most ``pool.max_sessions`` of a pool."""
        if self.stopping:
            raise ShuttingDown("the hub is shutting down and opens no new sessions")
        if (client, msg.id) in self.requests:
            raise BadRequest(f"request id {msg.id!r} is already in flight on this connection")
        provider = self._provider_for(msg.body)
        limit = provider.pool.session_limit
        active = sum(1 for j in self.requests.values() if j.session and j.provider == provider.name)
        if active >= limit:
            raise PoolBusy(
                f"provider {provider.name!r} has {active} live session(s), its limit (pool.max_sessions={limit}); "
                "the rest of the pool is kept for one-shot jobs"
            )
        ring = protocol.parse_ring(msg.body)
        if ring is not None and not ring.shm.startswith(self.shm_prefix):
            raise InvalidAudio(f"shared-memory ring {ring.shm!r} is not one of this hub's ({self.shm_prefix}*)")
        now = time.monotonic()
        timeout = protocol.parse_timeout(msg.body)
        job = Job(
            id=f"s{next(self.job_ids)}",
            client=client,
            request=msg.id,
            provider=provider.name,
            audio=AudioRef(samples=0),
            payload=None,
            options=protocol.parse_options(msg.body),
            stream=True,
            received_at=now,
            acquire_deadline=acquire_deadline(provider.pool, now, timeout),
            client_timeout=timeout,
            session=True,
            ring=ring,
            last_activity=now,
        )
        log.info("session %s: opened by request %s for %s", job.id, msg.id, provider.name)
        self.place(job, now)

    def _session(self, client: bytes, request_id: str) -> Job:
        job = self.requests.get((client, request_id))
        if job is None or not job.session:
            raise BadRequest(f"no live session {request_id!r} on this connection")
        if job.worker is None:
            raise BadRequest(f"session {request_id!r} has no worker yet; wait for the open to be answered")
        return job

    def session_data(self, client: bytes, msg: Message) -> None:
        job = self._session(client, msg.id)
        position = protocol.parse_stream_data(msg.body, msg.payload)
        if msg.payload is not None:
            self.inline_bytes += len(msg.payload)
            job.streamed += position
        else:
            job.streamed = position
        job.last_activity = time.monotonic()
        self._to_worker(job, MsgType.STREAM_DATA, msg.body, msg.payload)

    def close_session(self, job: Job, reason: str) -> None:
        """Ask the worker to flush and answer; a client's close has no reason, the hub's says why."""
        if job.closing:
            return
        job.closing = reason or "closed by the client"
        job.run_deadline = time.monotonic() + self.pools[job.provider].config.pool.job_timeout
        if reason:
            log.info("session %s: closing, %s", job.id, reason)
        self._to_worker(job, MsgType.STREAM_CLOSE, {"reason": reason} if reason else {}, None)

    def _to_worker(self, job: Job, msg_type: MsgType, body: dict[str, Any], payload: bytes | None) -> None:
        try:
            self.backend.send_multipart([(job.worker or "").encode(), *protocol.build(msg_type, job.id, body, payload)])
        except zmq.ZMQError:
            pass  # the worker is gone: reaping it fails the session

    def _provider_for(self, body: dict[str, Any]) -> ProviderConfig:
        name = body.get("provider") or self.default_provider
        if not isinstance(name, str):
            raise BadRequest("field 'provider' must be a provider name")
        provider = self.config.providers.get(name)
        if provider is None:
            known = ", ".join(p.name for p in self.config.enabled_providers)
            raise UnknownProvider(f"no provider named {name!r}; this hub serves: {known}")
        if not provider.enabled:
            raise ProviderUnavailable(f"provider {name!r} is disabled in the config (providers.{name}.enabled)")
        pool = self.pools[name]
        if pool.size == 0 and pool.load_failures:
            wait = max(0.0, pool.next_spawn_at - time.monotonic())
            raise ProviderUnavailable(
                f"provider {name!r} has no live worker: {pool.last_error} (next start in {wait:.0f} s)"
            )
        return provider

    def cancel(self, client: bytes, request_id: str) -> None:
        """The client gave up (its timeout): forget the job; a running one finishes and its answer is dropped."""
        job = self.requests.pop((client, request_id), None)
        if job is None:
            return
        if job.worker is None:
            self.queues[job.provider].remove(job)
        elif job.session:
            self.close_session(job, "the client went away")
        self._record(job, "JOB_TIMEOUT", time.monotonic())
        job.client = b""

    def scale_request(self, body: dict[str, Any]) -> dict[str, Any]:
        name, size = body.get("provider"), body.get("size")
        pool = self.pools.get(name) if isinstance(name, str) else None
        if pool is None or pool.removed:
            raise UnknownProvider(f"no enabled provider named {name!r}")
        if not isinstance(size, int) or isinstance(size, bool):
            raise BadRequest("field 'size' must be an integer")
        self.set_size(pool, size, clamp=False)
        return {"provider": pool.name, "size": size}

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

    # --- jobs on workers -----------------------------------------------------------

    def start_job(self, job: Job, worker: WorkerHandle, now: float) -> None:
        pool = self.pools[job.provider]
        job.attempts += 1
        job.worker = worker.id
        job.started_at = now
        job.run_deadline = run_deadline(pool.config.pool, job, now)
        worker.job = job.id
        pool.set_state(worker, WorkerState.BUSY, now)
        self.running[job.id] = job
        msg_type = MsgType.STREAM_OPEN if job.session else MsgType.JOB
        try:
            self.backend.send_multipart(
                [worker.id.encode(), *protocol.build(msg_type, job.id, job.job_body(), job.payload)]
            )
        except zmq.ZMQError as exc:
            self.recycle(worker, f"unreachable: {exc}", now)
            self.job_lost(job, WorkerCrashed(f"worker {worker.id} was unreachable"))
            return
        if job.session:
            job.last_activity = now
            self.reply(job.client, MsgType.REPLY, job.request, {"session": job.id, "worker": worker.id})

    def worker_free(self, worker: WorkerHandle, now: float) -> None:
        """A worker finished its job (or its start): give it the next job, or let it go if it is due to."""
        pool = self.pools[worker.provider]
        limits = pool.config.pool
        if worker.state is WorkerState.DRAINING:
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
        queue = self.queues[pool.name]
        while queue and pool.idle:
            job = queue.pop()
            worker = pool.take_idle()
            if job is not None and worker is not None:
                self.start_job(job, worker, now)

    def job_lost(self, job: Job, error: HubError) -> None:
        """The job's worker is gone: retry it once more where allowed, else tell the client."""
        self.running.pop(job.id, None)
        job.worker = None
        if job.health:
            return
        retries = 0 if job.session else self.pools[job.provider].config.pool.retry_on_crash
        if job.client and job.attempts <= retries and not self.stopping:
            log.info("job %s: retrying on another worker (%s)", job.id, error.message)
            self.queues[job.provider].push_front(job)
            return
        self.fail(job, error)

    def fail(self, job: Job, error: HubError) -> None:
        self.running.pop(job.id, None)
        self.requests.pop((job.client, job.request), None)
        error.job_id = job.request
        self._record(job, error.code, time.monotonic())
        self.reply(job.client, MsgType.ERROR, job.request, error.to_dict())

    def _record(self, job: Job, code: str | None, now: float) -> None:
        """Account for a client's job once, when its answer (or its client's give-up) is known."""
        if not job.client:
            return
        started = job.started_at or now
        run = now - job.started_at if job.started_at else 0.0
        self.metrics.finished(job.provider, now, started - job.received_at, run, job.audio_seconds, code)
        log.debug("job %s (request %s) %s in %.1f ms", job.id, job.request, code or "done", (now - job.received_at) * 1e3)

    # --- backend -------------------------------------------------------------------

    def on_backend(self, frames: list[bytes]) -> None:
        try:
            identity, rest = protocol.split_identity(frames)
            msg = protocol.parse(rest)
        except HubError as exc:
            self.malformed += 1
            log.warning("dropped a malformed message from a worker: %s", exc)
            return
        now = time.monotonic()
        worker = self._worker(identity.decode("ascii", "replace").removesuffix(".hb"))
        if worker is None:
            return
        if msg.type is MsgType.HEARTBEAT:
            worker.last_heartbeat = now
        elif msg.type is MsgType.READY:
            self.on_ready(worker, msg.body, now)
        elif msg.type is MsgType.LOAD_FAILED:
            worker.last_error = str(msg.body.get("error", "unknown error"))
        elif msg.type in (MsgType.SEGMENT, MsgType.PARTIAL):
            job = self.running.get(msg.id)
            if job is not None and job.worker == worker.id:
                self.reply(job.client, msg.type, job.request, msg.body)
        elif msg.type in (MsgType.RESULT, MsgType.ERROR) and worker.job == msg.id:
            self.on_answer(worker, msg, now)

    def on_answer(self, worker: WorkerHandle, msg: Message, now: float) -> None:
        """A worker's final answer to its job: forward it, account for it, free or recycle the worker."""
        job = self.running.pop(msg.id, None)
        worker.job = None
        model_failed = msg.type is MsgType.ERROR and msg.body.get("code") == "INFERENCE_FAILED"
        if job is not None and job.health:
            if model_failed or msg.type is MsgType.ERROR or not str(msg.body.get("text", "")).strip():
                reason = msg.body.get("message") or "no text for the test clip"
                self.recycle(worker, f"health check failed: {reason}", now)
                return
            worker.last_check = now
        elif job is not None:
            self.requests.pop((job.client, job.request), None)
            self._record(job, msg.body.get("code", "INFERENCE_FAILED") if msg.type is MsgType.ERROR else None, now)
            worker.jobs_done += 1
            body = dict(msg.body)
            if msg.type is MsgType.RESULT:
                body.update(worker=worker.id, provider=job.provider, queue_ms=(job.started_at - job.received_at) * 1000.0)
            else:
                body["job_id"] = job.request
            self.reply(job.client, msg.type, job.request, body)
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
        worker.last_heartbeat = worker.last_check = now
        pool.load_failures = 0
        pool.last_error = ""
        log.info("worker %s ready (pid %d, %s) in %.2f s", worker.id, worker.pid, worker.device, now - worker.started_at)
        old = [w for w in pool.workers.values() if w.live and w.generation < pool.generation]
        if worker.generation == pool.generation and old:
            replaced = next((w for w in old if w.state is WorkerState.IDLE), old[0])
            log.info("rolling restart of %s: %s replaces %s", pool.name, worker.id, replaced.id)
            self.drain(replaced, now)
        self.worker_free(worker, now)

    # --- timers --------------------------------------------------------------------

    def tick(self, now: float) -> None:
        sample = now >= self.next_sample
        if sample:
            self.next_sample = now + SAMPLE_INTERVAL
        for name, pool in list(self.pools.items()):
            for worker in list(pool.workers.values()):
                if sample:
                    self._sample(worker)
                self._watch(pool, worker, now)
            for job in self.queues[name].expired(now):
                self.fail(job, self._acquire_timeout(job, now))
            if pool.removed:
                if not pool.workers:
                    del self.pools[name], self.queues[name]
                continue
            if not self.stopping:
                self._health_checks(pool, now)
                self._roll(pool, now)
                self._scale(pool, now)
        if now >= self.next_sweep:
            self.next_sweep = now + SHM_SWEEP_INTERVAL
            for name in shm.sweep_orphans():
                log.info("removed orphaned shared-memory segment %s (its owner process is gone)", name)
        self.metrics.ready = ready = self.ready
        if sample or now >= self.next_summary:
            views = {name: self._view(pool, now) for name, pool in self.pools.items()}
            if sample:
                self.metrics.publish(status.gauges(views, ready))
            if now >= self.next_summary:
                self.next_summary = now + self.config.hub.metrics_log_interval
                for name, view in views.items():
                    log.info(status.summary_line(name, view))
        if not self.ready_logged and ready:
            self.ready_logged = True
            sizes = ", ".join(f"{n}: {p.size} worker(s)" for n, p in self.pools.items())
            log.info("hub ready in %.2f s on %s (%s)", now - self.started, self.config.hub.frontend, sizes)

    def _sample(self, worker: WorkerHandle) -> None:
        worker.rss_mb = rss_mb(worker.pid)
        if worker.gpu is not None and self.gpus.available:
            reading = self.gpus.read(worker.gpu)
            worker.gpu_used_mb, worker.gpu_utilization = reading.used_mb, reading.utilization

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
        job = self.running.get(worker.job or "")
        if worker.state is WorkerState.STARTING:
            if now - worker.started_at > hub.start_timeout:
                self.recycle(worker, f"not ready after {hub.start_timeout:.0f} s", now)
        elif now - worker.last_heartbeat > hub.heartbeat_timeout:
            self.recycle(worker, f"no heartbeat for {now - worker.last_heartbeat:.1f} s", now)
            if job is not None:
                self.job_lost(job, WorkerCrashed(f"worker {worker.id} stopped answering"))
        elif job is not None and job.session and not job.closing and (why := self._session_overdue(job, now)):
            self.close_session(job, why)
        elif job is not None and now >= job.run_deadline:
            limit = job.run_deadline - job.started_at
            what = "health check" if job.health else f"job {job.id}"
            self.recycle(worker, f"{what} overran its {limit:.0f} s deadline", now)
            if not job.health:
                self.fail(job, JobTimeout(f"the job did not finish within its {limit:.0f} s deadline; its worker was restarted"))

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
        if self.queues[pool.name]:
            return
        for worker_id in list(pool.idle):
            worker = pool.workers[worker_id]
            alone = len(pool.idle) == 1
            if now - worker.last_check < interval or (alone and now - worker.idle_since < interval):
                continue
            pool.idle.pop(worker_id)
            job = health_job(f"h{next(self.job_ids)}", pool.name, now)
            self.start_job(job, worker, now)

    def _roll(self, pool: ProviderPool, now: float) -> None:
        """After a reload, start one worker of the new generation at a time; ``on_ready`` retires an old one."""
        old = any(w.live and w.generation < pool.generation for w in pool.workers.values())
        starting = any(w.state is WorkerState.STARTING and w.generation == pool.generation for w in pool.workers.values())
        if old and not starting and now >= pool.next_spawn_at:
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
        if worker.job is not None or worker.kill_at is not None:
            return
        worker.kill_at = now + KILL_GRACE
        try:
            self.backend.send_multipart([worker.id.encode(), *protocol.build(MsgType.STOP, worker.id)])
        except zmq.ZMQError:
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
                for job in self.queues[pool.name].clear():
                    self.fail(job, ProviderUnavailable(f"provider {pool.name!r} has no live worker: {pool.last_error}"))
        elif worker.state is not WorkerState.DRAINING:
            what += f" ({worker.last_error})" if worker.last_error else ""
            pool.last_error = f"worker {worker.id} {what}"
            log.warning("worker %s (pid %d) %s", worker.id, worker.pid, what)
        job = self.running.get(worker.job or "")
        if job is not None:
            self.job_lost(job, WorkerCrashed(f"worker {worker.id} {what} while running the job"))

    def _snapshot(self, pool: ProviderPool) -> PoolSnapshot:
        counts = pool.counts()
        live = [w for w in pool.workers.values() if w.live]
        gpu = process.gpu_for(pool.config, [w.gpu for w in live if w.gpu is not None])
        gpu_free, gpu_worker = None, 0.0
        if gpu is not None and self.gpus.available:
            reading = self.gpus.read(gpu)
            on_gpu = sum(1 for w in live if w.gpu == gpu)
            if reading.free_mb is not None and reading.used_mb is not None and on_gpu:
                gpu_free, gpu_worker = reading.free_mb, reading.used_mb / on_gpu
        return PoolSnapshot(
            live=len(live),
            starting=counts[WorkerState.STARTING],
            queued=len(self.queues[pool.name]),
            idle_since=tuple((wid, pool.workers[wid].idle_since) for wid in pool.idle),
            floor=pool.floor,
            memory_mb=sum(w.rss_mb for w in live),
            worker_mb=max((w.rss_mb for w in live), default=0.0),
            gpu_free_mb=gpu_free,
            gpu_worker_mb=gpu_worker,
        )

    def _scale(self, pool: ProviderPool, now: float) -> None:
        if now < pool.next_spawn_at:
            return
        decision = decide(self._snapshot(pool), pool.config.pool, now)
        if decision.held_back != self.held_back.get(pool.name, ""):
            if decision.held_back:
                log.info("scaling of %s held back: %s", pool.name, decision.held_back)
            self.held_back[pool.name] = decision.held_back
        for worker_id in decision.retire:
            log.info("retiring worker %s of %s: idle, pool above its floor", worker_id, pool.name)
            self.drain(pool.workers[worker_id], now)
        for _ in range(decision.spawn):
            self.spawn(pool, now)

    def spawn(self, pool: ProviderPool, now: float) -> None:
        provider = pool.config
        gpu = process.gpu_for(provider, [w.gpu for w in pool.workers.values() if w.live and w.gpu is not None])
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
        proc = process.spawn(spec, provider, gpu)
        handle = WorkerHandle(spec.id, provider.name, proc, gpu, started_at=now, last_heartbeat=now)
        handle.generation, handle.slot, handle.restarts = pool.generation, slot, restarts
        pool.add(handle)
        log.info("started worker %s (pid %d%s)", spec.id, proc.pid, "" if gpu is None else f", CUDA_VISIBLE_DEVICES={gpu}")

    @property
    def ready(self) -> bool:
        """Every enabled provider has its ``min_size`` workers ready."""
        return all(
            sum(1 for w in pool.workers.values() if w.state in (WorkerState.IDLE, WorkerState.BUSY))
            >= pool.config.pool.min_size
            for pool in self.pools.values()
            if not pool.removed
        )

    # --- reload --------------------------------------------------------------------

    def reload(self) -> None:
        """SIGHUP: read the config again and replace every worker, one at a time; keep the old config if invalid."""
        if self.config_path is None:
            log.warning("SIGHUP ignored: the supervisor was not started from a config file")
            return
        try:
            new = load_config(self.config_path)
        except ConfigError as exc:
            log.error("config reload refused, the running config stays in force: %s", exc)
            return
        if new.hub.frontend != self.config.hub.frontend:
            log.warning("hub.frontend cannot change on reload (still %s); restart to move it", self.config.hub.frontend)
        new = dataclasses.replace(new, hub=dataclasses.replace(new.hub, frontend=self.config.hub.frontend))
        now = time.monotonic()
        for name, pool in self.pools.items():
            provider = new.providers.get(name)
            if provider is None or not provider.enabled:
                log.info("provider %s left the config: draining its workers", name)
                pool.removed = True
                for job in self.queues[name].clear():
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
                self.queues[name].limit = provider.pool.max_queue
        for provider in new.enabled_providers:
            if provider.name not in self.pools:
                self.pools[provider.name] = ProviderPool(provider)
                self.queues[provider.name] = JobQueue(provider.pool.max_queue)
        self.config = new
        log.info("config reloaded from %s: rolling restart of %s", self.config_path, ", ".join(self.pools))

    # --- status and shutdown -------------------------------------------------------

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        providers = {
            p.name: status.provider_status(p, self._view(self.pools[p.name], now) if p.name in self.pools else None, now)
            for p in self.config.providers.values()
        }
        return {
            "hub": {
                "id": self.hub_id,
                "pid": os.getpid(),
                "version": __version__,
                "frontend": self.config.hub.frontend,
                "uptime": round(now - self.started, 3),
                "ready": self.ready,
                "shutting_down": self.stopping,
                "dropped_replies": self.dropped,
                "malformed_messages": self.malformed,
                "inline_bytes": self.inline_bytes,
            },
            "providers": providers,
        }

    def _view(self, pool: ProviderPool, now: float) -> status.PoolView:
        return status.PoolView(
            pool=pool,
            queue_depth=len(self.queues[pool.name]),
            sessions=sum(1 for j in self.requests.values() if j.session and j.provider == pool.name),
            held_back=self.held_back.get(pool.name, ""),
            target_size=floor_size(self._snapshot(pool), pool.config.pool),
            figures=self.metrics.summary(pool.name, now, max(1, pool.size)),
            gpu_error="" if self.gpus.available else self.gpus.error,
        )

    def close(self) -> None:
        """Fail what is left, stop every worker (STOP, then SIGTERM, then SIGKILL), remove our files."""
        for queue in self.queues.values():
            for job in queue.clear():
                self.fail(job, ShuttingDown("the hub stopped before a worker could take this job"))
        for job in list(self.running.values()):
            self.fail(job, ShuttingDown("the hub stopped before the job finished"))
        workers = [w for pool in self.pools.values() for w in pool.workers.values()]
        for worker in workers:
            try:
                self.backend.send_multipart([worker.id.encode(), *protocol.build(MsgType.STOP, worker.id)])
            except zmq.ZMQError:
                pass
        _wait_all(workers, 2.0)
        for worker in workers:
            process.terminate(worker.proc)
        _wait_all(workers, KILL_GRACE)
        for worker in workers:
            process.kill(worker.proc)
        _wait_all(workers, KILL_GRACE)
        if self.http is not None:
            self.http.shutdown()
        self.frontend.close()
        self.backend.close()
        if self.auth is not None:
            self.auth.stop()
        self.ctx.term()
        self.backend_path.unlink(missing_ok=True)
        self.pid_path.unlink(missing_ok=True)
        removed = shm.remove_all(self.shm_prefix) + shm.sweep_orphans()
        log.info("supervisor stopped (%d worker(s) stopped, %d shared-memory segment(s) removed)", len(workers), len(removed))


def _wait_all(workers: list[WorkerHandle], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for worker in workers:
        try:
            worker.proc.wait(max(0.0, deadline - time.monotonic()))
        except Exception:
            pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hub.supervisor", description="Run the ASR Hub supervisor.")
    parser.add_argument("--config", required=True, help="path to the YAML config (see config/config.sample.yaml)")
    parser.add_argument("--frontend", help="override hub.frontend, e.g. tcp://127.0.0.1:5556")
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING ... (default: hub.log_level)")
    parser.add_argument("--log-format", choices=logs.FORMATS, help="text or json lines (default: hub.log_format)")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    overrides = {"frontend": args.frontend, "log_format": args.log_format}
    config = dataclasses.replace(
        config, hub=dataclasses.replace(config.hub, **{k: v for k, v in overrides.items() if v is not None})
    )
    try:
        check_exposure(config.hub)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    logs.configure(args.log_level or config.hub.log_level, config.hub.log_format)
    try:
        supervisor = Supervisor(config, Path(args.config))
    except zmq.ZMQError as exc:
        print(f"cannot bind {config.hub.frontend}: {exc} (is another hub running there?)", file=sys.stderr)
        return 2
    return supervisor.run()


if __name__ == "__main__":
    sys.exit(main())
