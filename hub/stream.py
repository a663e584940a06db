"""Live sessions, client side: push audio as it is captured, read partial and final text as it settles.

A session shares its worker with others until it is closed. On the supervisor's host the chunks go
into a per-session shared-memory ring and only positions travel over the socket;
elsewhere they travel inline. The worker acknowledges how far it has read with every
event, and ``send`` waits rather than overwrite audio the worker has not taken yet.
``StreamSession`` (blocking, safe to use from a sending and a reading thread at once)
and ``AsyncStreamSession`` share ``_SessionState``, which holds no I/O.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import zmq

from hub import protocol, shm
from hub.audio import AudioInput, StreamResampler, check_sample_rate, pcm16, to_pcm
from hub.errors import HubError, InvalidAudio, JobTimeout
from hub.protocol import SAMPLE_RATE, Message, MsgType
from hub.results import Segment, Transcript, join_text

RING_SECONDS = 30  # the ring holds this much audio the worker has not read yet
POLL_S = 0.01  # how often a waiting reader looks for events; the socket's lock is free in between


@dataclass(frozen=True)
class StreamEvent:
    """``partial``: text that may still change; ``final``: a segment that never will. ``heard``: seconds of
    the session's audio the worker had read when it sent the event (the text covers the audio up to there),
    which is how far behind the speech the text is."""

    kind: str
    text: str
    segment: Segment | None = None
    heard: float = 0.0


class _SessionState:
    """What a session has learned from its messages; no sockets, so both clients share it."""

    def __init__(self) -> None:
        self.events: deque[StreamEvent] = deque()
        self.finals: list[Segment] = []
        self.acked = 0  # samples the worker has read
        self.transcript: Transcript | None = None
        self.error: HubError | None = None

    @property
    def ended(self) -> bool:
        return self.transcript is not None or self.error is not None

    def handle(self, msg: Message) -> None:
        if self.ended:  # e.g. the hub refusing data sent before the client read that the session failed
            return
        if msg.type is MsgType.PARTIAL:
            self.acked = int(msg.body.get("read", self.acked))
            self.events.append(StreamEvent("partial", str(msg.body.get("text", "")), heard=self.acked / SAMPLE_RATE))
        elif msg.type is MsgType.SEGMENT:
            segment = Segment.from_dict(msg.body)
            self.acked = int(msg.body.get("read", self.acked))
            self.finals.append(segment)
            self.events.append(StreamEvent("final", segment.text, segment, self.acked / SAMPLE_RATE))
        elif msg.type is MsgType.RESULT:
            self.transcript = Transcript.from_dict(msg.body)
        elif msg.type is MsgType.ERROR:
            self.error = HubError.from_dict(msg.body)
            self.error.transcript = self.confirmed()  # type: ignore[attr-defined]

    def confirmed(self) -> Transcript:
        """The final text so far: what a session that failed still returns."""
        return Transcript(text=join_text(s.text for s in self.finals), segments=tuple(self.finals))

    def check_open(self) -> None:
        if self.error is not None:
            raise self.error
        if self.transcript is not None:
            reason = self.transcript.extra.get("closed_reason", "it was closed")
            raise JobTimeout(f"the session is over: the hub closed it ({reason})")


class ChunkAudio:
    """A session's chunks as float32 16 kHz, through one resampler kept for the whole stream.

    Resampling each chunk on its own restarts the filter at every chunk: 48 kHz audio sent in
    128-sample chunks came out 0.8 % long, with a click at every seam. One ``StreamResampler``
    (the gateway's WebSocket and Wyoming paths use the same class) gives the worker exactly what a
    whole-file resample gives; ``flush`` hands over the filter's tail when the session closes.
    The stream's rate is its first chunk's; a file path is decoded whole at its own rate.
    """

    def __init__(self) -> None:
        self._resampler: StreamResampler | None = None

    def pcm(self, chunk: AudioInput, sample_rate: int | None) -> np.ndarray:
        """The 16 kHz samples this chunk completes; an empty chunk is nothing to send rather than an error."""
        if isinstance(chunk, (str, os.PathLike)):
            return to_pcm(chunk, sample_rate)
        rate = check_sample_rate(SAMPLE_RATE if sample_rate is None else sample_rate)
        if self._resampler is None:
            self._resampler = StreamResampler(rate)
        elif rate != self._resampler.rate:
            raise InvalidAudio(
                f"a session keeps one sample rate: it began at {self._resampler.rate} Hz, this chunk says {rate} Hz"
            )
        if isinstance(chunk, (bytes, bytearray, memoryview)):
            chunk = pcm16(chunk)
        if not isinstance(chunk, np.ndarray):
            raise InvalidAudio(f"a chunk must be a numpy array or raw 16-bit PCM bytes, got {type(chunk).__name__}")
        return self._resampler.feed(chunk)

    def flush(self) -> np.ndarray:
        """What the resampler still holds: the last samples of the stream."""
        return np.zeros(0, dtype=np.float32) if self._resampler is None else self._resampler.flush()


def route_fields(options: dict[str, Any]) -> dict[str, Any]:
    """Take ``route_key`` (a user or device id: a sticky route keeps it on one version) out of a call's
    keyword options, where the SDK's calls accept it, into the request's own fields."""
    key = options.pop("route_key", None)
    return {} if key is None else {"route_key": key}


def open_body(provider: str | None, options: dict[str, Any], ring: shm.Ring | None, timeout: float) -> dict[str, Any]:
    ring_ref = {"shm": ring.name, "capacity": ring.capacity} if ring else None
    routed = route_fields(options)
    return {"provider": provider, "options": options, "ring": ring_ref, "timeout": timeout, **routed}


class StreamSession:
    """A live session from ``HubClient.open_stream``; a context manager that closes itself."""

    def __init__(
        self,
        sock: zmq.Socket,
        request_id: str,
        ring: shm.Ring | None,
        timeout: float,
        on_close: Callable[[StreamSession], None],
    ) -> None:
        self.sock, self._id, self._ring, self._timeout = sock, request_id, ring, timeout
        self._on_close = on_close
        self._lock = threading.Lock()
        self._state = _SessionState()
        self._audio = ChunkAudio()
        self._closed = False
        self.worker: str | None = None

    def _start(self, body: dict[str, Any]) -> StreamSession:
        deadline = time.monotonic() + self._timeout
        with self._lock:
            self.sock.send_multipart(protocol.build(MsgType.STREAM_OPEN, self._id, body))
            while self.worker is None:
                msg = self._next(deadline)
                if msg.type is MsgType.REPLY:
                    self.worker = str(msg.body.get("worker"))
                else:
                    self._state.handle(msg)
                    if self._state.error is not None:
                        self._release()
                        raise self._state.error
        return self

    @property
    def transcript(self) -> Transcript:
        """The final transcript once closed; until then, the text confirmed so far."""
        return self._state.transcript or self._state.confirmed()

    def send(self, chunk: AudioInput, sample_rate: int | None = None) -> None:
        """Push a chunk of any size: float32 or int16 numpy, or raw 16-bit PCM bytes (16 kHz unless told;
        every chunk of a session at the same rate)."""
        self._send_pcm(self._audio.pcm(chunk, sample_rate))

    def _send_pcm(self, pcm: np.ndarray) -> None:
        step = self._ring.capacity // 2 if self._ring else pcm.size or 1
        for start in range(0, pcm.size, step):
            self._send_piece(pcm[start : start + step])

    def _send_piece(self, pcm: np.ndarray) -> None:
        deadline = time.monotonic() + self._timeout
        with self._lock:
            self._pump(0)
            self._state.check_open()
            if self._ring is None:
                self.sock.send_multipart(protocol.build(MsgType.STREAM_DATA, self._id, {}, pcm.tobytes()))
                return
            while self._ring.written + pcm.size - self._state.acked > self._ring.capacity:
                if time.monotonic() >= deadline:
                    raise JobTimeout(f"the worker fell more than {RING_SECONDS} s of audio behind for {self._timeout:.0f} s")
                self._pump(int(POLL_S * 1000))
                self._state.check_open()
            end = self._ring.write(pcm)
            self.sock.send_multipart(protocol.build(MsgType.STREAM_DATA, self._id, {"end": end}))

    def results(self) -> Iterator[StreamEvent]:
        """Events as they arrive, until the session is closed (by ``close`` or by the hub)."""
        while True:
            with self._lock:  # never held while waiting, or a sending thread would starve
                if not self._state.events and not self._state.ended and not self._closed:
                    self._pump(0)
                event = self._state.events.popleft() if self._state.events else None
                over = self._state.ended or self._closed
            if event is not None:
                yield event
            elif over:
                if self._state.error is not None:
                    raise self._state.error
                return
            else:
                time.sleep(POLL_S)

    def close(self) -> Transcript:
        """Flush: the worker decodes what is left and answers the final transcript."""
        if not self._closed and not self._state.ended:
            self._send_pcm(self._audio.flush())
        with self._lock:
            if not self._closed:
                try:
                    if not self._state.ended:
                        self.sock.send_multipart(protocol.build(MsgType.STREAM_CLOSE, self._id))
                        deadline = time.monotonic() + self._timeout
                        while not self._state.ended:
                            self._state.handle(self._next(deadline))
                finally:
                    self._release()
        if self._state.error is not None:
            raise self._state.error
        assert self._state.transcript is not None
        return self._state.transcript

    def __enter__(self) -> StreamSession:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        try:
            self.close()
        except HubError:
            if exc_type is None:
                raise

    def _release(self) -> None:
        """Let go of the ring and the socket, without a word to the hub (its sweep and timeouts do the rest)."""
        if self._closed:
            return
        self._closed = True
        if self._ring is not None:
            self._ring.release()
        self._on_close(self)

    def _next(self, deadline: float) -> Message:
        """The next message for this session, or JobTimeout at the deadline."""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self.sock.poll(max(1, int(remaining * 1000))):
                raise JobTimeout(f"the hub did not answer the session within {self._timeout:.0f} s")
            msg = protocol.parse(self.sock.recv_multipart())
            if msg.id == self._id:
                return msg

    def _pump(self, timeout_ms: int) -> None:
        """Take whatever has arrived (waiting up to ``timeout_ms`` for the first message)."""
        while self.sock.poll(timeout_ms):
            msg = protocol.parse(self.sock.recv_multipart())
            if msg.id == self._id:
                self._state.handle(msg)
            timeout_ms = 0


class AsyncStreamSession:
    """The asyncio twin of ``StreamSession``, from ``AsyncHubClient.open_stream``."""

    def __init__(
        self,
        send: Callable[[list[bytes]], Any],
        inbox: asyncio.Queue[Message],
        request_id: str,
        ring: shm.Ring | None,
        timeout: float,
        on_close: Callable[[AsyncStreamSession], None],
    ) -> None:
        self._send_frames, self._inbox, self._id = send, inbox, request_id
        self.request_id = request_id
        self._ring, self._timeout, self._on_close = ring, timeout, on_close
        self._state = _SessionState()
        self._audio = ChunkAudio()
        self._closed = False
        self._changed = asyncio.Event()  # set (and replaced) whenever a message has been taken in
        self.worker: str | None = None

    async def _start(self, body: dict[str, Any]) -> AsyncStreamSession:
        await self._send_frames(protocol.build(MsgType.STREAM_OPEN, self._id, body))
        deadline = time.monotonic() + self._timeout
        while self.worker is None:
            msg = await self._next(deadline)
            if msg.type is MsgType.REPLY:
                self.worker = str(msg.body.get("worker"))
            else:
                self._state.handle(msg)
                if self._state.error is not None:
                    self._release()
                    raise self._state.error
        return self

    @property
    def transcript(self) -> Transcript:
        return self._state.transcript or self._state.confirmed()

    async def send(self, chunk: AudioInput, sample_rate: int | None = None) -> None:
        await self._send_pcm(self._audio.pcm(chunk, sample_rate))

    async def _send_pcm(self, pcm: np.ndarray) -> None:
        step = self._ring.capacity // 2 if self._ring else pcm.size or 1
        for start in range(0, pcm.size, step):
            piece = pcm[start : start + step]
            self._drain()
            self._state.check_open()
            if self._ring is None:
                await self._send_frames(protocol.build(MsgType.STREAM_DATA, self._id, {}, piece.tobytes()))
                continue
            deadline = time.monotonic() + self._timeout
            while self._ring.written + piece.size - self._state.acked > self._ring.capacity:
                await self._await_change(deadline)
                self._state.check_open()
            end = self._ring.write(piece)
            await self._send_frames(protocol.build(MsgType.STREAM_DATA, self._id, {"end": end}))

    async def results(self) -> AsyncIterator[StreamEvent]:
        while True:
            self._drain()
            if self._state.events:
                yield self._state.events.popleft()
                continue
            if self._state.ended or self._closed:
                if self._state.error is not None:
                    raise self._state.error
                return
            await self._await_change(None)

    async def close(self) -> Transcript:
        if not self._closed and not self._state.ended:
            await self._send_pcm(self._audio.flush())
        if not self._closed:
            try:
                if not self._state.ended:
                    await self._send_frames(protocol.build(MsgType.STREAM_CLOSE, self._id))
                    deadline = time.monotonic() + self._timeout
                    while not self._state.ended:
                        await self._await_change(deadline)
            finally:
                self._release()
        if self._state.error is not None:
            raise self._state.error
        assert self._state.transcript is not None
        return self._state.transcript

    async def __aenter__(self) -> AsyncStreamSession:
        return self

    async def __aexit__(self, exc_type: object, *exc: object) -> None:
        try:
            await self.close()
        except HubError:
            if exc_type is None:
                raise

    def _release(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._ring is not None:
            self._ring.release()
        self._on_close(self)

    def _drain(self) -> None:
        while not self._inbox.empty():
            self._handle(self._inbox.get_nowait())

    def _handle(self, msg: Message) -> None:
        self._state.handle(msg)
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def _await_change(self, deadline: float | None) -> None:
        """Take the next message, or wake when another task (a reader, a closer) took one.

        A sender, a reader and ``close`` may all wait at once: whichever gets a message
        takes it into the shared state and wakes the others, so none waits for a message
        that another already consumed."""
        changed = self._changed
        getter = asyncio.ensure_future(self._inbox.get())
        waiter = asyncio.ensure_future(changed.wait())
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            done, _ = await asyncio.wait({getter, waiter}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            # also when this task is cancelled: a getter left behind would take (and lose) the next message
            waiter.cancel()
            if getter.done() and not getter.cancelled():
                self._handle(getter.result())
            else:
                getter.cancel()  # a queued message stays queued: Queue.get only removes it when it returns
        if not done:
            raise JobTimeout(f"the hub did not answer the session within {self._timeout:.0f} s")

    async def _next(self, deadline: float) -> Message:
        try:
            return await asyncio.wait_for(self._inbox.get(), timeout=max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise JobTimeout(f"the hub did not answer the session within {self._timeout:.0f} s") from None
