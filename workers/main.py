"""The worker process: connect, load the model, announce ready, heartbeat, serve jobs until told to stop.

The heartbeat runs on its own thread and socket, so a job stuck inside native code
still shows the worker alive; the supervisor catches stuck jobs by their deadline
instead. A worker that cannot load its model, or whose model cannot decode the bundled
health clip once loaded (a missing cuBLAS/cuDNN, a dtype mismatch), says why (LOAD_FAILED)
and exits with ``ExitCode.MODEL_LOAD_ERROR`` so the supervisor backs off instead of
respawning in a loop: READY means the model has decoded speech on its device.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from hub import logs, protocol, shm
from hub.audio import to_pcm, validate_pcm
from hub.errors import HubError, InferenceFailed
from hub.protocol import ExitCode, Message, MsgType, WorkerSpec
from hub.results import Segment
from workers.cuda import visible_pci_bus_ids
from workers.engine import Engine, StreamSettings, check_options, load_engine
from workers.session import Session
from workers.turns import JOB, next_turn, stretched_step

log = logging.getLogger("workers")
_PR_SET_PDEATHSIG = 1
HEALTH_CLIP = Path(__file__).resolve().parent / "data" / "health.wav"  # real speech, "Hello world."


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM us when the supervisor dies, so no worker outlives it."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def _connect(ctx: zmq.Context, spec: WorkerSpec, identity: str) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IDENTITY, identity.encode())
    sock.connect(spec.backend)
    return sock


def _heartbeat(
    ctx: zmq.Context, spec: WorkerSpec, parent: int, stop: threading.Event, load: Callable[[], dict[str, Any]]
) -> None:
    sock = _connect(ctx, spec, f"{spec.id}.hb")
    try:
        while not stop.wait(spec.heartbeat_interval):
            if os.getppid() != parent:  # the supervisor is gone and no signal reached us
                os._exit(ExitCode.OK)
            sock.send_multipart(protocol.build(MsgType.HEARTBEAT, spec.id, load()))
    finally:
        sock.close()


class Worker:
    """Serves one-shot jobs and any number of live sessions (the supervisor decides how many), one turn
    at a time: take every message waiting, then decode whatever has waited longest (``workers.turns``)."""

    def __init__(self, spec: WorkerSpec, engine: Engine, sock: zmq.Socket) -> None:
        self.spec = spec
        self.engine = engine
        self.sock = sock
        self.segments = shm.SegmentReader(spec.shm_prefix)
        self.sessions: dict[str, Session] = {}
        self.jobs: deque[tuple[Message, float]] = deque()  # one-shot jobs waiting, with their arrival
        self.session_busy = 0.0  # seconds spent decoding sessions: the heartbeat reports it as the session load
        self.settings = StreamSettings(**spec.stream)  # the provider's step, before stretching, and window

    def send(self, msg_type: MsgType, job_id: str, body: dict[str, Any] | None = None) -> None:
        self.sock.send_multipart(protocol.build(msg_type, job_id, body))

    def load(self) -> dict[str, Any]:
        """What the heartbeat tells the supervisor (read from the heartbeat thread; plain numbers)."""
        turns = {sid: {"busy": s.busy, "step_s": s.interval} for sid, s in list(self.sessions.items())}
        return {"busy": self.session_busy, "sessions": len(turns), "turns": turns}

    def serve(self) -> None:
        """Take the supervisor's messages and serve them (jobs in order, sessions in turns) until STOP."""
        try:
            while self._take_messages():
                self._pace()
                due = {sid: s.due_since for sid, s in self.sessions.items() if s.due_since is not None}
                urgent = [sid for sid in due if self.sessions[sid].urgent]
                turn = next_turn(due, self.jobs[0][1] if self.jobs else None, urgent)
                if turn == JOB:
                    self.run_job(self.jobs.popleft()[0])
                elif turn is not None:
                    self._guard(self.sessions[turn], lambda session: self._spent(session.step()))
        finally:
            for session in self.sessions.values():
                session.close()

    def _pace(self) -> None:
        """Stretch every session's step evenly when one decode of each speaking session outlasts a step."""
        if not self.sessions:
            return
        step = stretched_step(self.settings.step_ms / 1000, (s.cost for s in self.sessions.values() if s.active), self.settings.window_seconds / 2)
        for session in self.sessions.values():
            session.pace(step)

    def _take_messages(self) -> bool:
        """Every message already waiting (waiting for one when there is nothing to do); False on STOP."""
        busy = bool(self.jobs) or any(s.due_since is not None for s in self.sessions.values())
        if not self.sock.poll(0 if busy else -1):
            return True
        while True:
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return True
            try:
                msg = protocol.parse(frames)
            except HubError as exc:
                log.warning("worker %s dropped a malformed message: %s", self.spec.id, exc)
                continue
            if msg.type is MsgType.STOP:
                return False
            self._on_message(msg)

    def _on_message(self, msg: Message) -> None:
        if msg.type is MsgType.JOB:
            self.jobs.append((msg, time.monotonic()))
        elif msg.type is MsgType.STREAM_OPEN:
            self.open_session(msg)
        elif (session := self.sessions.get(msg.id)) is not None:
            if msg.type is MsgType.STREAM_DATA:
                self._guard(session, lambda s: s.take(msg))
            elif msg.type is MsgType.STREAM_CLOSE:
                reason = msg.body.get("reason")
                if self._guard(session, lambda s: self._spent(s.finish(reason))):
                    self.sessions.pop(session.id).close()

    def _spent(self, seconds: float) -> None:
        self.session_busy += seconds

    def _guard(self, session: Session, action: Callable[[Session], None]) -> bool:
        """Run a session's step; a failure ends that session alone, with its error. False when it failed."""
        try:
            action(session)
            return True
        except HubError as exc:
            error = exc
        except Exception as exc:
            log.exception("session %s failed", session.id)
            error = InferenceFailed(f"{self.spec.type} model raised {type(exc).__name__}: {exc}")
        self.send(MsgType.ERROR, session.id, error.to_dict())
        self.sessions.pop(session.id, None)
        session.close()
        return False

    def run_job(self, msg: Message) -> None:
        started = time.perf_counter()
        try:
            pcm = self._pcm(msg)
            options = {**self.spec.options, **protocol.parse_options(msg.body)}
            check_options(self.engine, self.spec.type, options)

            def on_segment(segment: Segment) -> None:
                if msg.body.get("stream"):
                    self.send(MsgType.SEGMENT, msg.id, segment.to_dict())

            result = self.engine.transcribe(pcm, options, on_segment)
        except HubError as exc:
            self.send(MsgType.ERROR, msg.id, exc.to_dict())
            return
        except Exception as exc:
            log.exception("worker %s: job %s failed", self.spec.id, msg.id)
            err = InferenceFailed(f"{self.spec.type} model raised {type(exc).__name__}: {exc}")
            self.send(MsgType.ERROR, msg.id, err.to_dict())
            return
        body = {
            "text": result.text,
            "segments": [s.to_dict() for s in result.segments],
            "language": result.language,
            "duration": result.duration,
            "inference_ms": (time.perf_counter() - started) * 1000.0,
        }
        self.send(MsgType.RESULT, msg.id, body)

    def open_session(self, msg: Message) -> None:
        try:
            self.sessions[msg.id] = Session(self.spec, self.engine, self.sock, msg)
        except HubError as exc:
            self.send(MsgType.ERROR, msg.id, exc.to_dict())
        except Exception as exc:
            log.exception("worker %s: cannot open a session", self.spec.id)
            error = InferenceFailed(f"cannot open a live session on {self.spec.type}: {exc}")
            self.send(MsgType.ERROR, msg.id, error.to_dict())

    def _pcm(self, msg: Message) -> np.ndarray:
        if msg.body.get("health"):
            return _health_clip()
        ref = protocol.parse_audio_ref(msg.body, msg.payload, max_samples=2**31)
        if ref.shm is not None:
            pcm = self.segments.read(ref.shm, ref.samples)
        else:
            pcm = np.frombuffer(msg.payload or b"", dtype=np.float32)
        return validate_pcm(pcm)


@cache
def _health_clip() -> np.ndarray:
    return to_pcm(HEALTH_CLIP)


def health_decode(spec: WorkerSpec, engine: Engine) -> None:
    """Decode the bundled clip once with the provider's options; raise what a failure says, naming the device."""
    options = dict(spec.options)
    try:
        check_options(engine, spec.type, options)
        engine.transcribe(_health_clip(), options, lambda segment: None)
    except Exception as exc:
        message = exc.message if isinstance(exc, HubError) else f"{type(exc).__name__}: {exc}"
        raise RuntimeError(f"the model loaded on {engine.device} but cannot decode the health clip: {message}") from exc


def ready_body(spec: WorkerSpec, engine: Engine) -> dict[str, Any]:
    """READY: where the model really runs and, on a GPU, the PCI bus id of the card CUDA gave this process."""
    body = {"provider": spec.provider, "model": spec.model, "device": engine.device, "pid": os.getpid()}
    if engine.device.startswith("cuda"):
        seen = visible_pci_bus_ids()
        body["cuda_pci_bus_id"] = seen[0] if seen else ""
    return body


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m workers", description="ASR Hub worker (started by the supervisor)")
    parser.add_argument("--spec", required=True, help="the WorkerSpec as JSON")
    args = parser.parse_args(argv)
    try:
        spec = WorkerSpec.from_json(args.spec)
    except (ValueError, TypeError) as exc:
        print(f"worker: bad --spec: {exc}")
        return ExitCode.BOOT_ERROR
    logs.configure("INFO", spec.log_format, name=spec.id)
    parent = os.getppid()
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the supervisor decides

    ctx = zmq.Context()
    sock = _connect(ctx, spec, spec.id)
    try:
        try:
            engine = load_engine(spec)
            health_decode(spec, engine)
        except Exception as exc:
            log.error("cannot load model: %s", exc)
            sock.send_multipart(protocol.build(MsgType.LOAD_FAILED, spec.id, {"error": str(exc)}))
            time.sleep(0.2)  # linger=0 would drop the message: give it time to leave
            return ExitCode.MODEL_LOAD_ERROR
        stop = threading.Event()
        worker = Worker(spec, engine, sock)
        beat = threading.Thread(
            target=_heartbeat, args=(ctx, spec, parent, stop, worker.load), daemon=True, name="heartbeat"
        )
        beat.start()
        sock.send_multipart(protocol.build(MsgType.READY, spec.id, ready_body(spec, engine)))
        worker.serve()
        stop.set()
        beat.join()
        return ExitCode.OK
    finally:
        sock.close()
        ctx.term()
