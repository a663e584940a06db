"""The supervisor: one poll loop that owns the sockets, the signals and the timers (gunicorn's arbiter).

Each pass of the loop reads a batch from each socket that has messages: a client's message
goes to the farm (``Farm.admit`` for new work), a worker's to ``Farm.on_worker``. Every
``TICK_INTERVAL`` (not on every wake-up: under load the loop wakes per message) it runs
``tick``: the farm's timer work (reap, kill the overdue, heartbeats, deadlines, health
checks, rolling restarts, scaling), the gateway child, the sweep of orphaned shared memory,
the metrics. Signal handlers only enqueue; a socketpair registered with
``signal.set_wakeup_fd`` wakes the poll, and the loop calls ``handle_<name>`` for each
signal queued. Admission and placing are the farm's; the workers' life and every message to a
worker are its workforce's (``hub.supervisor.workforce``).

Words used once: a *shutdown* is the hub stopping (SIGTERM/SIGINT: no new work, up to
``hub.drain_timeout`` for what is in flight); a worker *drains* when it finishes what it
has and stops (``Workforce.drain``, state ``draining``); the loop *reads a batch* of a socket.

Run it as ``python -m hub.supervisor --config config/config.sample.yaml``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
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

from hub import __version__, logs, protocol, shm, status
from hub.config import (
    ConfigError,
    CurveConfig,
    HubConfig,
    check_exposure,
    hub_id,
    load_config,
    pid_file,
)
from hub.connections import ConnectionLimits
from hub.errors import BadRequest, HubError, InternalError
from hub.protocol import Message, MsgType
from hub.supervisor import probes, views
from hub.supervisor.cards import Cards
from hub.supervisor.farm import Farm
from hub.supervisor.gateway_child import GatewayChild
from hub.supervisor.jobs import Jobs
from hub.supervisor.metrics import Metrics
from hub.supervisor.process import ProcessIO
from hub.supervisor.release.rollout import Rollout
from hub.supervisor.sessions import Sessions
from hub.supervisor.workforce import Workforce

log = logging.getLogger("hub.supervisor")

TICK_INTERVAL = 0.05  # seconds between timer passes (reap, deadlines, heartbeats, scaling), busy or not
SHM_SWEEP_INTERVAL = 2.0
# A full collection this often. It is what empties CPython's free lists (up to 2,000 dead tuples of each length
# 1-19, kept for reuse): tuples built by resizing (``tuple(generator)``) refill them, and a supervisor that makes
# few containers seldom runs a full collection on its own, so without this they grew with every worker respawn
# (~0.3 KiB each) for thousands of respawns. It takes ~8 ms.
HEAP_SWEEP_INTERVAL = 60.0
SAMPLE_INTERVAL = 1.0  # how often worker memory is read
MAX_BATCH = 256  # messages read from one socket before the loop looks at the others
SHUTDOWN_CLOSE = "the hub is shutting down"  # the reason a live session is closed with when the hub stops
SIGNALS = ("HUP", "INT", "TERM", "TTIN", "TTOU")  # each handled by ``Supervisor.handle_<name lowercased>``


def handler_name(signum: int) -> str:
    """The method that handles a signal: ``handle_term`` for SIGTERM (gunicorn's arbiter)."""
    return "handle_" + signal.Signals(signum).name.removeprefix("SIG").lower()


class Supervisor:
    """The hub's process: sockets, the loop, signals and timers; the farm does the rest."""

    def __init__(self, config: HubConfig, config_path: Path | None = None, pid_path: Path | None = None) -> None:
        self.config_path = config_path
        self.hub_id = hub_id(config.hub.frontend)
        self.shm_prefix = shm.hub_prefix(self.hub_id)
        self.started = time.monotonic()
        status.HubStatus().to_dict()  # builds the status codec now: the first STATUS is then answered as fast as any
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
        self.rollout = Rollout(config.routes, self.metrics)
        # the supervisor core, side by side: the workers, the live sessions, the one-shot jobs (no clock, no I/O)
        self.workforce = Workforce(config, ProcessIO(self.backend), Cards(), self.backend_path, self.shm_prefix)
        jobs = Jobs()
        self.sessions = Sessions(jobs, self.workforce, self.reply, self.metrics)
        self.farm = Farm(config, jobs, self.workforce, self.sessions, self.reply, self.metrics, self.rollout)
        self.probes: probes.ProbeServer | None = None
        self.gateway = self._gateway_child(config, config_path)
        self.next_summary = time.monotonic() + config.hub.metrics_log_interval
        self.sig_queue: deque[int] = deque()  # filled by the signal handler, emptied by the loop
        self.shutdown_deadline = 0.0  # when a shutdown stops waiting for jobs in flight
        self.ready_logged = False
        self.next_sweep = 0.0
        self.next_heap_sweep = time.monotonic() + HEAP_SWEEP_INTERVAL
        self.next_tick = 0.0
        self.next_sample = 0.0
        self.dropped = 0  # replies dropped because a client stopped reading
        self.malformed = 0  # messages refused as BAD_REQUEST, or dropped when from a worker

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
        """Serve until a shutdown ends: poll the sockets, handle signals, run the timers; return the exit status."""
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
        for name in SIGNALS:
            signal.signal(getattr(signal, f"SIG{name}"), lambda signum, _frame: self.sig_queue.append(signum))
        poller = zmq.Poller()
        poller.register(self.frontend, zmq.POLLIN)
        poller.register(self.backend, zmq.POLLIN)
        poller.register(wake_r, zmq.POLLIN)
        log.info("supervisor %s (pid %d) listening on %s", self.hub_id, os.getpid(), self.config.hub.frontend)
        hub = self.config.hub
        if hub.metrics_port:
            limits = ConnectionLimits(hub.metrics_header_timeout, hub.metrics_max_connections)
            self.probes = probes.serve(self.metrics, hub.metrics_host, hub.metrics_port, limits)
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
                self.handle_signals()
                if self.backend in events:
                    self._read_batch(self.backend, self.on_backend)
                if self.frontend in events:
                    self._read_batch(self.frontend, self.on_frontend)
                if (now := time.monotonic()) >= self.next_tick:
                    self.tick(now)
        finally:
            signal.set_wakeup_fd(-1)
            wake_r.close()
            wake_w.close()
            self.close()
        return 0

    def _read_batch(self, sock: zmq.Socket, handler: Callable[[list[bytes]], None]) -> None:
        """Handle up to ``MAX_BATCH`` messages of one socket, so that the other is not starved."""
        for _ in range(MAX_BATCH):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            handler(frames)

    # --- signals: the handlers only enqueue; the loop calls handle_<name> ----------

    def handle_signals(self) -> None:
        """Handle the queued signals in order, each by its ``handle_<name>``."""
        while self.sig_queue:
            getattr(self, handler_name(self.sig_queue.popleft()))()

    def handle_hup(self) -> None:
        self.reload()

    def handle_term(self) -> None:
        self.begin_shutdown("SIGTERM")

    def handle_int(self) -> None:
        self.begin_shutdown("SIGINT")

    def handle_ttin(self) -> None:
        self.workforce.step_sizes(+1, time.monotonic())

    def handle_ttou(self) -> None:
        self.workforce.step_sizes(-1, time.monotonic())

    def begin_shutdown(self, why: str) -> None:
        """Refuse new work and give jobs in flight ``hub.drain_timeout``; a second signal stops at once."""
        if self.farm.stopping:
            log.warning("%s again: stopping now, without waiting for jobs in flight", why)
            self.shutdown_deadline = 0.0
            return
        timeout = self.config.hub.drain_timeout
        log.info("%s: shutting down (no new jobs; up to %.0f s for jobs in flight, hub.drain_timeout)", why, timeout)
        self.farm.begin_shutdown()
        self.shutdown_deadline = time.monotonic() + timeout
        self.sessions.close_all(SHUTDOWN_CLOSE, time.monotonic())

    def _finished(self, now: float) -> bool:
        if not self.farm.stopping:
            return False
        return not self.farm.in_flight or now >= self.shutdown_deadline

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
            exc.request_id = request_id
            self.reply(client, MsgType.ERROR, request_id, exc.to_dict())
        except Exception:  # a bug must cost one request, never the supervisor
            log.exception("internal error while handling request %s", request_id)
            error = InternalError(
                "the hub failed to handle this request; its log has the details", request_id=request_id
            )
            self.reply(client, MsgType.ERROR, request_id, error.to_dict())

    def on_client_message(self, client: bytes, msg: Message) -> None:
        """One client message, to the room that handles it: new work and sessions to the farm, the rest here."""
        if msg.type in (MsgType.TRANSCRIBE, MsgType.STREAM_OPEN):
            self.farm.admit(client, msg, time.monotonic())
        elif msg.type is MsgType.STREAM_DATA:
            self.sessions.data(client, msg, time.monotonic())
        elif msg.type is MsgType.STREAM_CLOSE:
            self.sessions.close(client, msg.id, time.monotonic())
        elif msg.type is MsgType.CANCEL:
            self.farm.cancel(client, msg.id, time.monotonic())
        elif msg.type is MsgType.STATUS:
            self.reply(client, MsgType.REPLY, msg.id, self.status().to_dict())
        elif msg.type is MsgType.HELLO:
            self.reply(client, MsgType.REPLY, msg.id, self.hello(msg.body))
        elif msg.type is MsgType.SCALE:
            self.reply(
                client,
                MsgType.REPLY,
                msg.id,
                self.workforce.scale(msg.body.get("provider"), msg.body.get("size"), time.monotonic()),
            )
        elif msg.type is MsgType.ROUTE:
            route, weights = protocol.parse_weights(msg.body)
            known = {p.name for p in self.config.enabled_providers}
            weights = self.rollout.set_weights(route, weights, known)
            self.reply(client, MsgType.REPLY, msg.id, {"route": route, "weights": weights})
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
            msg = protocol.parse(rest, protocol.MAX_ANSWER_BODY_BYTES)
        except HubError as exc:
            self.malformed += 1
            log.warning("dropped a malformed message from a worker: %s", exc)
            return
        self.farm.on_worker(identity, msg, time.monotonic())

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
        if now >= self.next_heap_sweep:
            self.next_heap_sweep = now + HEAP_SWEEP_INTERVAL
            gc.collect()
        self.metrics.ready = ready = (
            self.workforce.ready and not self.farm.stopping
        )  # shutting down: out of the Service
        self.metrics.loop_at = now
        if sample or now >= self.next_summary:
            pool_views = self.farm.views(now)
            if sample:
                self.metrics.publish(views.gauges(pool_views, ready))
            if now >= self.next_summary:
                self.next_summary = now + self.config.hub.metrics_log_interval
                for name, view in pool_views.items():
                    log.info(views.summary_line(name, view))
        self._log_ready(now)

    def _log_ready(self, now: float) -> None:
        """Say once that the hub is ready; also checked before a status reply, so the log says it first."""
        if not self.ready_logged and self.workforce.ready and not self.farm.stopping:
            self.ready_logged = True
            sizes = ", ".join(f"{name}: {size} worker(s)" for name, size in self.workforce.sizes.items())
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
            self.gateway.reload(new.gateway)
        elif new.gateway.enabled:
            self.gateway = self._gateway_child(new, self.config_path)
        log.info("config reloaded from %s: rolling restart of %s", self.config_path, ", ".join(self.workforce.sizes))

    def status(self) -> status.HubStatus:
        now = time.monotonic()
        self._log_ready(now)
        pool_views = self.farm.views(now)
        providers = {
            p.name: views.provider_status(p, pool_views.get(p.name), now) for p in self.config.providers.values()
        }
        hub = status.HubInfo(
            id=self.hub_id,
            pid=os.getpid(),
            version=__version__,
            frontend=self.config.hub.frontend,
            uptime=round(now - self.started, 3),
            ready=self.workforce.ready,
            shutting_down=self.farm.stopping,
            dropped_replies=self.dropped,
            malformed_messages=self.malformed,
            inline_bytes=self.farm.inline_bytes + self.sessions.inline_bytes,
        )
        gateway = None if self.gateway is None else self.gateway.status()
        return status.HubStatus(hub=hub, providers=providers, routes=self.rollout.status(), gateway=gateway)

    def close(self) -> None:
        """Fail what is left, stop every worker (STOP, then SIGTERM, then SIGKILL), remove our files."""
        stopped = self.farm.close(time.monotonic())
        if self.gateway is not None:
            self.gateway.stop()
        if self.probes is not None:
            self.probes.shutdown()
        self.frontend.close()
        self.backend.close()
        if self.auth is not None:
            self.auth.stop()
        self.ctx.term()
        self.backend_path.unlink(missing_ok=True)
        self.pid_path.unlink(missing_ok=True)
        removed = shm.remove_all(self.shm_prefix) + shm.sweep_orphans()
        log.info(
            "supervisor stopped (%d worker(s) stopped, %d shared-memory segment(s) removed)", stopped, len(removed)
        )


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
