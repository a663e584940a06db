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
import math
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
from hub.errors import BadRequest, HubError, InferenceFailed, JobTimeout
from hub.protocol import ExitCode, Message, MsgType, WorkerSpec
from hub.results import Segment
from workers import cutting
from workers.batch import batch_ready
from workers.cuda import visible_pci_bus_ids
from workers.engine import DecodeItem, Engine, Outcome, StreamSettings, check_options, load_engine, no_segments
from workers.session import Session
from workers.streaming import StreamUpdate, step_together
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
    at a time: take every message waiting, then decode whatever has waited longest (``workers.turns``).
    The one-shot jobs it holds (up to ``max_batch``, sent by the supervisor while it has room) decode
    together in one forward pass (``Engine.transcribe_batch``) once the batch is full or its oldest job
    has waited ``batch_wait_ms`` (``workers.batch.batch_ready``). A session's turn steps, with it, up to
    ``max_batch`` due sessions that share its decoder, in one forward pass. Every pass (jobs or steps) is
    told to the supervisor (BATCH) for the batch-size figures."""

    def __init__(self, spec: WorkerSpec, engine: Engine, sock: zmq.Socket) -> None:
        self.spec = spec
        self.engine = engine
        self.sock = sock
        self.segments = shm.SegmentReader(spec.shm_prefix)
        self.sessions: dict[str, Session] = {}
        self.jobs: deque[tuple[Message, float]] = deque()  # one-shot jobs held, not started, with their arrival
        self.session_busy = 0.0  # seconds spent decoding sessions: the heartbeat reports it as the session load
        self.batch_wait = spec.batch_wait_ms / 1000.0
        self.vad = cutting.the_vad()  # where a long request's plan cuts (Silero, or none without faster-whisper)
        if self.vad is cutting.all_speech:
            log.warning("no faster-whisper here: long requests are cut at their quietest points, without a VAD")
        self.settings = StreamSettings(**spec.stream)  # the provider's step, before stretching, and window

    def send(self, msg_type: MsgType, job_id: str, body: dict[str, Any] | None = None) -> None:
        self.sock.send_multipart(protocol.build(msg_type, job_id, body))

    def load(self) -> dict[str, Any]:
        """What the heartbeat tells the supervisor (read from the heartbeat thread; plain numbers)."""
        turns = {sid: {"busy": s.busy, "step_s": s.interval} for sid, s in list(self.sessions.items())}
        return {"busy": self.session_busy, "sessions": len(turns), "turns": turns}

    def serve(self) -> None:
        """Take the supervisor's messages and serve them (jobs in batches, sessions in turns) until STOP."""
        try:
            while self._take_messages():
                self._pace()
                due = {sid: s.due_since for sid, s in self.sessions.items() if s.due_since is not None}
                urgent = [sid for sid in due if self.sessions[sid].urgent]
                turn = next_turn(due, self.jobs[0][1] if self._batch_ready() else None, urgent)
                if turn == JOB:
                    self.run_batch([self.jobs.popleft()[0] for _ in range(min(len(self.jobs), self.spec.max_batch))])
                elif turn is not None:
                    self._step(self.sessions[turn])
        finally:
            for session in self.sessions.values():
                session.close()

    def _step(self, first: Session) -> None:
        """Step ``first``, and in the same forward pass the due sessions that may join it (``_joining``)."""
        together = [first, *self._joining(first)]
        self.send(MsgType.BATCH, self.spec.id, {"jobs": [s.id for s in together]})
        if len(together) == 1:
            self._guard(first, lambda session: self._spent(session.step()))
            return
        started = time.perf_counter()
        updates = step_together([streamer for s in together if (streamer := s.batched) is not None])
        share = (time.perf_counter() - started) / len(together)
        for session, update in zip(together, updates, strict=True):
            self._guard(session, self._stepped(update, share))

    def _joining(self, first: Session) -> list[Session]:
        """With ``max_batch`` over 1, the other due sessions that share ``first``'s decoder, the longest waiting
        first, up to ``max_batch`` in all."""
        mine = first.batched
        if mine is None or self.spec.max_batch < 2:
            return []
        others = [
            s
            for s in self.sessions.values()
            if s is not first and s.due_since is not None and (b := s.batched) is not None and b.batch == mine.batch
        ]
        return sorted(others, key=lambda s: s.due_since or 0.0)[: self.spec.max_batch - 1]

    def _stepped(self, update: StreamUpdate | Exception, share: float) -> Callable[[Session], None]:
        """What a session does with its step's outcome from a shared pass."""
        return lambda session: self._spent(session.stepped(update, share))

    def _batch_ready(self) -> bool:
        if not self.jobs:
            return False
        return batch_ready(len(self.jobs), self.jobs[0][1], time.monotonic(), self.spec.max_batch, self.batch_wait)

    def _wait_ms(self) -> int:
        """How long to wait for a message: not at all while something is due, until a partial batch's wait
        ends, or (-1) until one comes."""
        if self._batch_ready() or any(s.due_since is not None for s in self.sessions.values()):
            return 0
        if self.jobs:
            return max(1, math.ceil((self.jobs[0][1] + self.batch_wait - time.monotonic()) * 1000))
        return -1

    def _pace(self) -> None:
        """Stretch every session's step evenly when one decode of each speaking session outlasts a step."""
        if not self.sessions:
            return
        step = stretched_step(
            self.settings.step_ms / 1000,
            (s.cost for s in self.sessions.values() if s.active),
            self.settings.window_seconds / 2,
        )
        for session in self.sessions.values():
            session.pace(step)

    def _take_messages(self) -> bool:
        """Every message already waiting (waiting for one when there is nothing to do); False on STOP."""
        if not self.sock.poll(self._wait_ms()):
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
        elif msg.type is MsgType.CANCEL:
            self._cancel(msg.id)
        elif msg.type is MsgType.STREAM_OPEN:
            self.open_session(msg)
        elif (session := self.sessions.get(msg.id)) is not None:
            if msg.type is MsgType.STREAM_DATA:
                self._guard(session, lambda s: s.take(msg))
            elif msg.type is MsgType.STREAM_CLOSE:
                reason = msg.body.get("reason")
                if self._guard(session, lambda s: self._spent(s.finish(reason))):
                    self.sessions.pop(session.id).close()

    def _cancel(self, job_id: str) -> None:
        """A held job whose client gave up leaves the jobs waiting for a batch; one already decoding goes on
        (its answer is dropped by the supervisor)."""
        held = next((entry for entry in self.jobs if entry[0].id == job_id), None)
        if held is not None:
            self.jobs.remove(held)
            self.send(MsgType.ERROR, job_id, JobTimeout("cancelled by its client before its batch started").to_dict())

    def _spent(self, seconds: float) -> None:
        self.session_busy += seconds

    def _guard(self, session: Session, action: Callable[[Session], None]) -> bool:
        """Run a session's step; a failure ends that session alone, with its error. False when it failed."""
        try:
            action(session)
            return True
        except Exception as exc:
            error = self._error(exc, f"session {session.id}")
        self.send(MsgType.ERROR, session.id, error.to_dict())
        self.sessions.pop(session.id, None)
        session.close()
        return False

    def _error(self, exc: Exception, what: str) -> HubError:
        """A failure as the error its job or session answers: a HubError as it is, anything else the model's."""
        if isinstance(exc, HubError):
            return exc
        log.error("worker %s: %s failed: %s: %s", self.spec.id, what, type(exc).__name__, exc, exc_info=exc)
        return InferenceFailed(f"{self.spec.type} model raised {type(exc).__name__}: {exc}")

    def run_batch(self, msgs: list[Message]) -> None:
        """Decode the held jobs ``msgs`` together; each answers alone (a job whose audio or options are bad
        fails before the batch starts, one the model fails fails alone)."""
        started = time.perf_counter()
        items, held = [], []
        for msg in msgs:
            if "plan" in msg.body:  # where to cut a long request: no decode, never batched
                self._run_plan(msg)
                continue
            try:
                items.append(self._item(msg))
                held.append(msg)
            except Exception as exc:
                self.send(MsgType.ERROR, msg.id, self._error(exc, f"job {msg.id}").to_dict())
        if not held:
            return
        self.send(MsgType.BATCH, self.spec.id, {"jobs": [msg.id for msg in held]})
        try:
            outcomes: list[Outcome] = self.engine.transcribe_batch(items)
        except Exception as exc:  # an adapter's own failure: every job of the batch fails with it
            outcomes = [exc] * len(held)
        inference_ms = (time.perf_counter() - started) * 1000.0
        for msg, outcome in zip(held, outcomes, strict=True):
            if isinstance(outcome, Exception):
                self.send(MsgType.ERROR, msg.id, self._error(outcome, f"job {msg.id}").to_dict())
                continue
            body = {
                "text": outcome.text,
                "segments": [s.to_dict() for s in outcome.segments],
                "language": outcome.language,
                "duration": outcome.duration,
                "inference_ms": inference_ms,
            }
            self.send(MsgType.RESULT, msg.id, body)

    def _run_plan(self, msg: Message) -> None:
        started = time.perf_counter()
        try:
            body = self._plan(msg)
        except Exception as exc:
            self.send(MsgType.ERROR, msg.id, self._error(exc, f"plan {msg.id}").to_dict())
            return
        self.send(MsgType.RESULT, msg.id, {**body, "inference_ms": (time.perf_counter() - started) * 1000.0})

    def _item(self, msg: Message) -> DecodeItem:
        """A held job as a decode item: its audio and checked options, its segments streamed where it asked."""
        pcm = self._pcm(msg)
        options = {**self.spec.options, **protocol.parse_options(msg.body)}
        check_options(self.engine, self.spec.type, options)

        def on_segment(segment: Segment) -> None:
            self.send(MsgType.SEGMENT, msg.id, segment.to_dict())

        piece = msg.body.get("piece") is True
        return DecodeItem(pcm, options, on_segment if msg.body.get("stream") else no_segments, piece)

    def _plan(self, msg: Message) -> dict[str, Any]:
        """Where to cut a long request (``workers.cutting``): each piece goes to the supervisor as a SEGMENT
        as soon as its end is known, so its decoding starts while the rest is planned."""
        piece = msg.body["plan"].get("piece") if isinstance(msg.body["plan"], dict) else None
        if not isinstance(piece, int) or isinstance(piece, bool) or piece < 2 * cutting.MIN_GAP:
            raise BadRequest(f"field 'plan.piece' must be a piece length of at least {2 * cutting.MIN_GAP} samples")
        count = 0
        for part in cutting.plan(self._pcm(msg), piece, self.vad):
            self.send(MsgType.SEGMENT, msg.id, part.to_dict())
            count += 1
        return {"pieces": count}

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
            pcm = self.segments.read(ref.shm, ref.samples, ref.offset)
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
