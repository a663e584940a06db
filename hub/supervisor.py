"""The supervisor: one poll loop that wires the frontend, the workers, the signals and the timers.

Each pass of the loop reads what the sockets have; every ``TICK_INTERVAL`` (not on every
wake-up: under load the loop wakes per message) it runs ``tick``: reap exited workers,
kill the overdue, enforce heartbeats and deadlines, expire queued jobs, run health
checks, roll restarts forward, scale, and sweep orphaned shared memory. Signal
handlers only enqueue (gunicorn's arbiter); a socketpair registered with
``signal.set_wakeup_fd`` wakes the poll.

Run it as ``python -m hub.supervisor --config config/config.sample.yaml``.
"""

from __future__ import annotations

import argparse
import dataclasses
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

from hub import __version__, http, logs, protocol, shm, status
from hub.children import GatewayChild
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
from hub.dispatch import Job, acquire_deadline
from hub.errors import (
    BadRequest,
    HubError,
    InternalError,
    InvalidAudio,
    PoolBusy,
    ProviderUnavailable,
    ShuttingDown,
    UnknownProvider,
)
from hub.farm import Farm
from hub.metrics import Metrics
from hub.policy import floor_size
from hub.protocol import AudioRef, Message, MsgType
from hub.resume import AudioTail
from hub.rollout import Rollout

log = logging.getLogger("hub.supervisor")

TICK_INTERVAL = 0.05  # seconds between timer passes (reap, deadlines, heartbeats, scaling), busy or not
SHM_SWEEP_INTERVAL = 2.0
SAMPLE_INTERVAL = 1.0  # how often worker memory is read
MAX_BATCH = 256  # messages read from one socket before the loop looks at the others
_HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU)


class Supervisor:
    def __init__(self, config: HubConfig, config_path: Path | None = None, pid_path: Path | None = None) -> None:
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
        self.pid_path = pid_path or pid_file(config)
        self.pid_path.write_text(f"{os.getpid()}\n")
        self.metrics = Metrics()
        self.farm = Farm(config, self.backend, self.backend_path, self.shm_prefix, self.reply, self.metrics)
        self.rollout = Rollout(config.routes, self.metrics)
        self.farm.routed_ended = self.rollout.ended
        self.http: Any = None
        self.gateway = self._gateway_child(config, config_path)
        self.next_summary = time.monotonic() + config.hub.metrics_log_interval
        self.signals: deque[int] = deque()
        self.drain_deadline = 0.0
        self.ready_logged = False
        self.next_sweep = 0.0
        self.next_tick = 0.0
        self.next_sample = 0.0
        self.dropped = 0  # replies dropped because a client stopped reading
        self.malformed = 0  # messages refused as BAD_REQUEST, or dropped when from a worker
        self.inline_bytes = 0  # PCM bytes that crossed the supervisor (only clients without shared memory)

    def _gateway_child(self, config: HubConfig, config_path: Path | None) -> GatewayChild | None:
        if not config.gateway.enabled:
            return None
        if config_path is None:
            log.warning("gateway.enabled ignored: the supervisor was not started from a config file")
            return None
        level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
        return GatewayChild(config.gateway, config_path, config.hub.frontend, level, config.hub.log_format)

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
    def config(self) -> HubConfig:
        return self.farm.config

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
            while not self._finished(now := time.monotonic()):
                events = dict(poller.poll(max(0, int((self.next_tick - now) * 1000) + 1)))
                if wake_r.fileno() in events:
                    try:
                        wake_r.recv(4096)
                    except BlockingIOError:
                        pass
                    self.next_tick = 0.0  # a signal: act on it in this pass
                self._handle_signals()
                if self.backend in events:
                    self._drain_socket(self.backend, self.on_backend)
                if self.frontend in events:
                    self._drain_socket(self.frontend, self.on_frontend)
                if (now := time.monotonic()) >= self.next_tick:
                    self.tick(now)
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
                for pool in self.farm.pools.values():
                    if not pool.removed:
                        self.farm.set_size(pool, floor_size(self.farm._snapshot(pool), pool.config.pool) + step, clamp=True)
            elif self.farm.stopping:
                log.warning("%s again: stopping now, without waiting for jobs in flight", name)
                self.drain_deadline = 0.0
            else:
                log.info("%s: draining (no new jobs; up to %.0f s for jobs in flight)", name, self.config.hub.drain_timeout)
                self.farm.stopping = True
                self.drain_deadline = time.monotonic() + self.config.hub.drain_timeout

    def _finished(self, now: float) -> bool:
        if not self.farm.stopping:
            return False
        return not self.farm.requests or now >= self.drain_deadline

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
            self.farm.cancel(client, msg.id)
        elif msg.type is MsgType.SCALE:
            self.reply(client, MsgType.REPLY, msg.id, self.scale_request(msg.body))
        elif msg.type is MsgType.ROUTE:
            route, weights = protocol.parse_weights(msg.body)
            known = {p.name for p in self.config.enabled_providers}
            weights = self.rollout.set_weights(route, weights, known)
            self.reply(client, MsgType.REPLY, msg.id, {"route": route, "weights": weights})
        elif msg.type is MsgType.STREAM_DATA:
            self.session_data(client, msg)
        elif msg.type is MsgType.STREAM_CLOSE:
            self.farm.close_session(self._session(client, msg.id), "")
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

    def on_backend(self, frames: list[bytes]) -> None:
        try:
            identity, rest = protocol.split_identity(frames)
            msg = protocol.parse(rest)
        except HubError as exc:
            self.malformed += 1
            log.warning("dropped a malformed message from a worker: %s", exc)
            return
        self.farm.on_worker(identity, msg)

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
            "routes": list(self.config.routes),
            "default_provider": self.default_provider,
            "max_audio_seconds": self.config.hub.max_audio_seconds,
        }

    def _admit(self, client: bytes, msg: Message) -> tuple[ProviderConfig, str]:
        """The checks every new job or session passes first; returns the provider it goes to and the route
        that chose it ("" when the request named a provider)."""
        if self.farm.stopping:
            raise ShuttingDown("the hub is shutting down and takes no new work; retry once it is back")
        if (client, msg.id) in self.farm.requests:
            raise BadRequest(f"request id {msg.id!r} is already in flight on this connection")
        name = msg.body.get("provider")
        routed = self.rollout.resolve(name, protocol.parse_route_key(msg.body)) if isinstance(name, str) else None
        if routed is None:
            return self._provider_for(msg.body), ""
        return self._provider_for({"provider": routed}), name

    def submit(self, client: bytes, msg: Message) -> None:
        provider, route = self._admit(client, msg)
        audio = protocol.parse_audio_ref(
            msg.body, msg.payload, max_samples=int(self.config.hub.max_audio_seconds * protocol.SAMPLE_RATE)
        )
        if audio.shm is not None:
            self._own_segment(audio.shm)
        if msg.payload is not None:
            self.inline_bytes += len(msg.payload)
        job = self._new_job(
            client, msg, provider, "j", audio=audio, payload=msg.payload, stream=bool(msg.body.get("stream", False)), route=route
        )
        log.debug("job %s: request %s for %s, %.2f s of audio", job.id, msg.id, provider.name, audio.seconds)
        self.farm.place(job, job.received_at)
        shadow = self.rollout.shadow_for(route) if route else None
        if shadow is not None:
            self._shadow(job, shadow)

    def _shadow(self, primary: Job, provider: str) -> None:
        """Send a copy of the request to the route's shadow, if one of its workers is idle now; else drop it.
        Its PCM is the primary's: the same inline bytes, or a second name for the client's segment."""
        if not self.farm.shadow_room(provider):
            self.rollout.dropped(primary.route, provider)
            return
        audio = primary.audio
        if audio.shm is not None:
            try:
                audio = AudioRef(samples=audio.samples, shm=shm.share(audio.shm, self.shm_prefix))
            except InvalidAudio as exc:
                log.debug("shadow of job %s dropped: %s", primary.id, exc)
                self.rollout.dropped(primary.route, provider)
                return
        now = time.monotonic()
        shadow = Job(
            id=f"w{next(self.farm.job_ids)}", client=b"", request="", provider=provider, audio=audio,
            payload=primary.payload, options=primary.options, stream=False, received_at=now, acquire_deadline=now,
            client_timeout=None, route=primary.route, shadow=True,
        )
        self.rollout.paired(primary, shadow)
        self.farm.place_shadow(shadow, now)

    def _own_segment(self, name: str) -> None:
        if not name.startswith(self.shm_prefix):
            raise InvalidAudio(f"shared-memory segment {name!r} is not one of this hub's ({self.shm_prefix}*)")

    def _new_job(self, client: bytes, msg: Message, provider: ProviderConfig, kind: str, **fields: Any) -> Job:
        """A job or a session (``kind`` "j" or "s" prefixes its id) with what every request has in common."""
        now = time.monotonic()
        timeout = protocol.parse_timeout(msg.body)
        return Job(
            id=f"{kind}{next(self.farm.job_ids)}",
            client=client,
            request=msg.id,
            provider=provider.name,
            options=protocol.parse_options(msg.body),
            received_at=now,
            acquire_deadline=acquire_deadline(provider.pool, now, timeout),
            client_timeout=timeout,
            **fields,
        )

    def open_session(self, client: bytes, msg: Message) -> None:
        """A live stream, one of several on a worker until it closes; at most ``pool.max_sessions`` of a pool."""
        provider, route = self._admit(client, msg)
        limit = provider.pool.session_limit
        active = self.farm.sessions(provider.name)
        if active >= limit:
            raise PoolBusy(
                f"provider {provider.name!r} has {active} live session(s), its limit (pool.max_sessions={limit}); "
                "the rest of the pool is kept for one-shot jobs"
            )
        ring = protocol.parse_ring(msg.body)
        if ring is not None:
            self._own_segment(ring.shm)
        job = self._new_job(
            client, msg, provider, "s", audio=AudioRef(samples=0), payload=None, stream=True, session=True, ring=ring, route=route
        )
        job.last_activity = job.received_at
        if ring is None:  # inline chunks: the supervisor keeps the recent ones, for a resume on another worker
            job.tail = AudioTail(int(provider.stream.window_seconds * protocol.SAMPLE_RATE))
        log.info("session %s: opened by request %s for %s", job.id, msg.id, provider.name)
        self.farm.place(job, job.received_at)

    def _session(self, client: bytes, request_id: str) -> Job:
        job = self.farm.requests.get((client, request_id))
        if job is None or not job.session:
            raise BadRequest(f"no live session {request_id!r} on this connection")
        if job.attempts == 0:
            raise BadRequest(f"session {request_id!r} has no worker yet; wait for the open to be answered")
        return job

    def session_data(self, client: bytes, msg: Message) -> None:
        job = self._session(client, msg.id)
        position = protocol.parse_stream_data(msg.body, msg.payload)
        if msg.payload is not None:
            self.inline_bytes += len(msg.payload)
        self.farm.session_data(job, msg.body, msg.payload, position)

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
        pool = self.farm.pools[name]
        if pool.size == 0 and pool.load_failures:
            wait = max(0.0, pool.next_spawn_at - time.monotonic())
            raise ProviderUnavailable(
                f"provider {name!r} has no live worker: {pool.last_error} (next start in {wait:.0f} s)"
            )
        return provider

    def scale_request(self, body: dict[str, Any]) -> dict[str, Any]:
        name, size = body.get("provider"), body.get("size")
        pool = self.farm.pools.get(name) if isinstance(name, str) else None
        if pool is None or pool.removed:
            raise UnknownProvider(f"no enabled provider named {name!r}")
        if not isinstance(size, int) or isinstance(size, bool):
            raise BadRequest("field 'size' must be an integer")
        self.farm.set_size(pool, size, clamp=False)
        return {"provider": pool.name, "size": size}

    def tick(self, now: float) -> None:
        """The timer work, every ``TICK_INTERVAL``; what is due less often (sampling, the sweep) keeps its own time."""
        self.next_tick = now + TICK_INTERVAL
        sample = now >= self.next_sample
        if sample:
            self.next_sample = now + SAMPLE_INTERVAL
        self.farm.tick(now, sample)
        if self.gateway is not None and not self.farm.stopping:
            self.gateway.tick(now)
        if now >= self.next_sweep:
            self.next_sweep = now + SHM_SWEEP_INTERVAL
            for name in shm.sweep_orphans():
                log.info("removed orphaned shared-memory segment %s (its owner process is gone)", name)
        self.metrics.ready = ready = self.farm.ready and not self.farm.stopping  # draining: out of the Service
        self.metrics.loop_at = now
        if sample or now >= self.next_summary:
            views = {name: self.farm.view(pool, now) for name, pool in self.farm.pools.items()}
            if sample:
                self.metrics.publish(status.gauges(views, ready))
            if now >= self.next_summary:
                self.next_summary = now + self.config.hub.metrics_log_interval
                for name, view in views.items():
                    log.info(status.summary_line(name, view))
        self._log_ready(now)

    def _log_ready(self, now: float) -> None:
        """Say once that the hub is ready; also checked before a status reply, so the log says it first."""
        if not self.ready_logged and self.farm.ready and not self.farm.stopping:
            self.ready_logged = True
            sizes = ", ".join(f"{n}: {p.size} worker(s)" for n, p in self.farm.pools.items())
            log.info("hub ready in %.2f s on %s (%s)", now - self.started, self.config.hub.frontend, sizes)

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
        self.farm.reconfigure(new, time.monotonic())
        self.rollout.reconfigure(new.routes)
        if self.gateway is not None:
            self.gateway.reload()
        log.info("config reloaded from %s: rolling restart of %s", self.config_path, ", ".join(self.farm.pools))

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        self._log_ready(now)
        providers = {
            p.name: status.provider_status(p, self.farm.view(self.farm.pools[p.name], now) if p.name in self.farm.pools else None, now)
            for p in self.config.providers.values()
        }
        return {
            "hub": {
                "id": self.hub_id,
                "pid": os.getpid(),
                "version": __version__,
                "frontend": self.config.hub.frontend,
                "uptime": round(now - self.started, 3),
                "ready": self.farm.ready,
                "shutting_down": self.farm.stopping,
                "dropped_replies": self.dropped,
                "malformed_messages": self.malformed,
                "inline_bytes": self.inline_bytes,
            },
            "providers": providers,
            "routes": self.rollout.status(),
            **({"gateway": self.gateway.status()} if self.gateway is not None else {}),
        }

    def close(self) -> None:
        """Fail what is left, stop every worker (STOP, then SIGTERM, then SIGKILL), remove our files."""
        stopped = self.farm.shutdown()
        if self.gateway is not None:
            self.gateway.stop()
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
        log.info("supervisor stopped (%d worker(s) stopped, %d shared-memory segment(s) removed)", stopped, len(removed))


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
    pid_path = pid_file(config)  # from the file as written, where scripts/rollback.sh looks, whatever the flags
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
        supervisor = Supervisor(config, Path(args.config), pid_path)
    except zmq.ZMQError as exc:
        print(f"cannot bind {config.hub.frontend}: {exc} (is another hub running there?)", file=sys.stderr)
        return 2
    return supervisor.run()


if __name__ == "__main__":
    sys.exit(main())
