"""A live session on a worker: chunks in (from the client's ring or inline), partials and finals out.

A worker holds several sessions at once (``workers.main`` gives them turns). A session decodes
once ``step_ms`` of new audio has come, after the worker took every chunk already waiting: a
decode slower than the speech then covers more audio rather than falling further behind, so the
delay from speaking to final text stays bounded. Every PARTIAL and SEGMENT says how far the ring
has been read and from where a worker taking over would need the audio (``keep``): the client
writes on only over audio before ``keep``. A session opened with ``resume`` takes over from a
worker that died (``hub.resume``). With ``stream.vad``, the session also tells its client where speech
starts and stops and when all of an utterance's finals have been sent (EVENT), and decodes only speech.
A session's step interval is its worker's to stretch (``pace``) when its sessions need more decoding than
it can do (``workers.turns.stretched_step``); ``cost`` is what its decodes have been taking. Sessions whose
streamers share a ``batch`` may be stepped together, in one forward pass (``stepped``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
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
from workers.streaming import SpeechEvent, StreamUpdate, WindowStreamer
from workers.turns import smoothed


class Session:
    def __init__(self, spec: WorkerSpec, engine: Engine, sock: zmq.Socket, msg: Message) -> None:
        self.spec, self.sock, self.id = spec, sock, msg.id
        options = {**spec.options, **protocol.parse_options(msg.body)}
        check_options(engine, spec.type, options)
        self.language = engine.stream_language(options)
        ring = protocol.parse_ring(msg.body)
        self.ring = shm.RingReader(ring.shm, ring.capacity, spec.shm_prefix) if ring else None
        turns = protocol.parse_turn_detection(msg.body)
        # a client that sent no turn_detection predates VAD: it cannot read EVENT or HEARD, so it gets no VAD,
        # and steps that are never stretched (it learns how far its ring may be reused only from its text)
        self.legacy = turns is None
        settings = replace(StreamSettings(**spec.stream), **(turns if turns is not None else {"vad": False}))
        self.step_seconds = settings.step_ms / 1000  # the provider's; ``pace`` may stretch it
        self.interval = self.step_seconds  # the step interval in force
        self.cost = 0.0  # seconds a decode of this session takes (smoothed); 0 until it has decoded once
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
        self.told = self.read  # the read position the client was last told
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
            for event in self.streamer.events():
                self._event(event)
        if self.streamer.due and self.due_since is None:
            self.due_since = time.monotonic()
        elif not self.legacy and self.due_since is None and self.read - self.told >= self.step_seconds * SAMPLE_RATE:
            # no text to send (with VAD nobody speaks; or its steps are stretched): the client still learns, once
            # per step_ms of audio read, how far its ring may be reused
            self.send(MsgType.HEARD, self._position())

    @property
    def urgent(self) -> bool:
        return self.streamer.urgent

    @property
    def active(self) -> bool:
        return self.streamer.active

    def pace(self, seconds: float) -> None:
        """Step after ``seconds`` of new audio from now on (never less than the provider's ``step_ms``)."""
        self.interval = self.step_seconds if self.legacy else max(self.step_seconds, seconds)
        self.streamer.pace(self.interval)

    @property
    def batched(self) -> WindowStreamer | None:
        """Its streamer, where its steps can share a forward pass with those of other sessions with the same
        ``batch`` (``workers.streaming.step_together``); None where they cannot."""
        streamer = self.streamer
        return streamer if isinstance(streamer, WindowStreamer) and streamer.batch is not None else None

    def step(self) -> float:
        """Decode its window once; returns the seconds the decode took."""
        return self.stepped(*_timed(self.streamer.step))

    def stepped(self, update: StreamUpdate | Exception, spent: float) -> float:
        """A step's outcome, decoded alone or with other sessions' steps (``spent``: this session's share of the
        pass): its text and events go to the client; an exception raises (the step failed). Returns ``spent``."""
        self.due_since = None
        if isinstance(update, Exception):
            raise update
        self._send(update, spent)
        self.cost = smoothed(self.cost, spent)
        return spent

    def finish(self, reason: str | None) -> float:
        """Decode what is left, answer the final transcript; returns the seconds the decodes took. Utterances
        that ended before the close and wait for their finals (VAD, a busy worker) get theirs first, each with
        its own ``utterance`` event."""
        spent = 0.0
        while self.streamer.urgent:
            spent += self._send(*_timed(self.streamer.step))
        spent += self._send(*_timed(self.streamer.finish))
        self.send(
            MsgType.RESULT,
            {
                "text": join_text(s.text for s in self.finals),
                "segments": [s.to_dict() for s in self.finals],
                "language": self.language,
                "duration": self.streamer.seconds,
                "inference_ms": self.busy * 1000.0,
                "extra": {"decodes": self.streamer.decodes, **({"closed_reason": reason} if reason else {})},
            },
        )
        return spent

    def close(self) -> None:
        if self.ring is not None:
            self.ring.close()

    def _position(self) -> dict[str, int]:
        self.told = self.read
        return {"read": self.read, "keep": keep_from(self.streamer.needs_from, self.read, self.bound)}

    def _event(self, event: SpeechEvent) -> None:
        self.send(MsgType.EVENT, {"kind": event.kind.value, "text": event.text, "at": event.at, **self._position()})

    def _send(self, update: StreamUpdate, spent: float) -> float:
        """What a decode produced, to the client: boundaries heard, the final, the partial, an utterance's end.
        Returns ``spent``, the decode's seconds."""
        self.busy += spent
        position = self._position()
        for event in self.streamer.events():  # a close that ended an utterance still in progress
            self._event(event)
        if update.final is not None:
            self.finals.append(update.final)
            self.send(MsgType.SEGMENT, {**update.final.to_dict(), **position})
        if update.partial is not None:
            self.send(MsgType.PARTIAL, {"text": update.partial, **position})
        for event in update.events:
            self._event(event)
        return spent


def _timed(decode: Callable[[], StreamUpdate]) -> tuple[StreamUpdate, float]:
    """A decode's update, and the seconds it took."""
    started = time.perf_counter()
    update = decode()
    return update, time.perf_counter() - started
