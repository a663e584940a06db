"""A live session on a worker: chunks in (from the client's ring or inline), partials and finals out.

The worker is leased to the session until STREAM_CLOSE. It decodes once ``step_ms`` of
new audio has come, after taking every chunk already waiting: a decode slower than the
speech then covers more audio rather than falling further behind, so the delay from
speaking to final text stays bounded. Every PARTIAL and SEGMENT says how far the ring
has been read, which is how the client knows it may write on.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import zmq

from hub import protocol, shm
from hub.audio import validate_pcm
from hub.errors import BadRequest, HubError, InferenceFailed
from hub.protocol import Message, MsgType, WorkerSpec
from hub.results import Segment, join_text
from workers.engine import Engine, StreamSettings, check_options
from workers.streaming import StreamUpdate

log = logging.getLogger("workers")


class Session:
    def __init__(self, spec: WorkerSpec, engine: Engine, sock: zmq.Socket, msg: Message) -> None:
        self.spec, self.sock, self.id = spec, sock, msg.id
        options = {**spec.options, **protocol.parse_options(msg.body)}
        check_options(engine, spec.type, options)
        self.language = options.get("language")
        ring = protocol.parse_ring(msg.body)
        self.ring = shm.RingReader(ring.shm, ring.capacity, spec.shm_prefix) if ring else None
        self.streamer = engine.open_stream(options, StreamSettings(**spec.stream))
        self.read = 0
        self.finals: list[Segment] = []
        self.busy = 0.0  # seconds spent decoding

    def send(self, msg_type: MsgType, body: dict[str, Any]) -> None:
        self.sock.send_multipart(protocol.build(msg_type, self.id, body))

    def serve(self) -> bool:
        """Run until the session closes; False when a STOP came instead (the worker should exit)."""
        try:
            while True:
                frames = self.sock.recv_multipart()
                while frames is not None:  # take everything already waiting before the next decode
                    msg = protocol.parse(frames)
                    if msg.type is MsgType.STOP:
                        return False
                    if msg.id == self.id and msg.type is MsgType.STREAM_CLOSE:
                        self._finish(msg.body.get("reason"))
                        return True
                    if msg.id == self.id and msg.type is MsgType.STREAM_DATA:
                        self._take(msg)
                    frames = self._pending()
                if self.streamer.due:
                    self._emit(self._timed(self.streamer.step))
        except HubError as exc:
            exc.job_id = self.id
            self.send(MsgType.ERROR, exc.to_dict())
            return True
        except Exception as exc:
            log.exception("session %s failed", self.id)
            error = InferenceFailed(f"{self.spec.type} model raised {type(exc).__name__}: {exc}", job_id=self.id)
            self.send(MsgType.ERROR, error.to_dict())
            return True
        finally:
            if self.ring is not None:
                self.ring.close()

    def _pending(self) -> list[bytes] | None:
        try:
            return self.sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return None

    def _take(self, msg: Message) -> None:
        position = protocol.parse_stream_data(msg.body, msg.payload)
        if msg.payload is not None:
            pcm = np.frombuffer(msg.payload, dtype=np.float32)
            self.read += pcm.size
        elif self.ring is None:
            raise BadRequest("this session was opened without a ring: send chunks inline")
        else:
            pcm = self.ring.read(self.read, position)
            self.read = position
        if pcm.size:
            self.streamer.feed(validate_pcm(pcm))

    def _timed(self, step: Any) -> StreamUpdate:
        started = time.perf_counter()
        update = step()
        self.busy += time.perf_counter() - started
        return update

    def _emit(self, update: StreamUpdate) -> None:
        if update.final is not None:
            self.finals.append(update.final)
            self.send(MsgType.SEGMENT, {**update.final.to_dict(), "read": self.read})
        self.send(MsgType.PARTIAL, {"text": update.partial, "read": self.read})

    def _finish(self, reason: str | None) -> None:
        self._emit(self._timed(self.streamer.finish))
        self.send(
            MsgType.RESULT,
            {
                "text": join_text(s.text for s in self.finals),
                "segments": [s.to_dict() for s in self.finals],
                "language": self.language,
                "duration": self.streamer.seconds,
                "inference_ms": self.busy * 1000.0,
                "extra": {"closed_reason": reason} if reason else {},
            },
        )
