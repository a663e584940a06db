"""A live session on a worker: chunks in (from the client's ring or inline), partials and finals out.

A worker holds several sessions at once (``workers.main`` gives them turns). A session decodes
once ``step_ms`` of new audio has come, after the worker took every chunk already waiting: a
decode slower than the speech then covers more audio rather than falling further behind, so the
delay from speaking to final text stays bounded. Every PARTIAL and SEGMENT says how far the ring
has been read and from where a worker taking over would need the audio (``keep``): the client
writes on only over audio before ``keep``. A session opened with ``resume`` takes over from a
worker that died (``hub.resume``).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import zmq

from hub import protocol, shm
from hub.audio import validate_pcm
from hub.errors import BadRequest
from hub.protocol import SAMPLE_RATE, Message, MsgType, WorkerSpec
from hub.results import Segment, join_text
from hub.resume import keep_from
from workers.engine import Engine, StreamSettings, check_options
from workers.streaming import StreamUpdate


class Session:
    def __init__(self, spec: WorkerSpec, engine: Engine, sock: zmq.Socket, msg: Message) -> None:
        self.spec, self.sock, self.id = spec, sock, msg.id
        options = {**spec.options, **protocol.parse_options(msg.body)}
        check_options(engine, spec.type, options)
        self.language = engine.stream_language(options)
        ring = protocol.parse_ring(msg.body)
        self.ring = shm.RingReader(ring.shm, ring.capacity, spec.shm_prefix) if ring else None
        settings = StreamSettings(**spec.stream)
        self.streamer = engine.open_stream(options, settings)
        self.read = 0
        # a resume never needs audio older than the window, nor more than half the ring (the client
        # must always be able to write)
        window = int(settings.window_seconds * SAMPLE_RATE)
        self.bound = min(window, ring.capacity // 2) if ring else window
        resume = protocol.parse_resume(msg.body)
        if resume is not None:  # taking over from a worker that died: the supervisor sends the audio from start
            self.read = resume.start
            self.streamer.resume(resume.start, [Segment.from_dict(f) for f in resume.finals])
        self.finals: list[Segment] = []  # the finals of this worker (a resumed session's earlier ones are the hub's)
        self.busy = 0.0  # seconds spent decoding
        self.due_since: float | None = None  # when it last became due for a decode

    def send(self, msg_type: MsgType, body: dict[str, Any]) -> None:
        self.sock.send_multipart(protocol.build(msg_type, self.id, body))

    def take(self, msg: Message) -> None:
        """A STREAM_DATA message: the chunk it carries inline, or the ring up to the position it names."""
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
        if self.streamer.due and self.due_since is None:
            self.due_since = time.monotonic()

    def step(self) -> float:
        """Decode its window once; returns the seconds the decode took."""
        self.due_since = None
        return self._emit(self.streamer.step)

    def finish(self, reason: str | None) -> float:
        """Decode what is left, answer the final transcript; returns the seconds the decode took."""
        spent = self._emit(self.streamer.finish)
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
        return spent

    def close(self) -> None:
        if self.ring is not None:
            self.ring.close()

    def _emit(self, decode: Any) -> float:
        started = time.perf_counter()
        update: StreamUpdate = decode()
        spent = time.perf_counter() - started
        self.busy += spent
        position = {"read": self.read, "keep": keep_from(self.streamer.needs_from, self.read, self.bound)}
        if update.final is not None:
            self.finals.append(update.final)
            self.send(MsgType.SEGMENT, {**update.final.to_dict(), **position})
        self.send(MsgType.PARTIAL, {"text": update.partial, **position})
        return spent
