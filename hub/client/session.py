"""Live sessions, client side: push audio as it is captured, read partial and final text as it settles.

A session shares its worker with others until it is closed. On the supervisor's host the chunks go
into a per-session shared-memory ring and only positions travel over the socket;
elsewhere they travel inline. The worker says with every event from where a worker taking over
would need the audio (``keep``), and ``send`` waits rather than overwrite it: when the worker dies,
the supervisor moves the session to another, which reads on from there (the client sees only a
gap in partials, and a REPLY naming the new worker).
``StreamSession`` (blocking, safe to use from a sending and a reading thread at once)
and ``AsyncStreamSession`` share ``_SessionCore``, which holds the protocol and no I/O: they differ
only in how they wait (a poll on the session's own socket; an asyncio inbox).
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
from hub.client.call import route_fields
from hub.errors import HubError, HubUnreachable, InvalidAudio, JobTimeout
from hub.protocol import SAMPLE_RATE, Message, MsgType
from hub.results import Segment, Transcript, join_text

RING_SECONDS = 30  # the ring holds this much audio the worker has not read yet
CLOSED = "this session is closed: its client closed it, or it never opened"
POLL_MS = 10  # how often a waiting reader looks for events; the socket's lock is free in between


EVENT_KINDS = ("speech_started", "speech_stopped", "utterance")  # with VAD on (``stream.vad``)


@dataclass(frozen=True)
class StreamEvent:
    """``partial``: text that may still change; ``final``: a segment that never will. ``heard``: seconds of
    the session's audio the worker had read when it sent the event (the text covers the audio up to there),
    which is how far behind the speech the text is.

    With VAD on, also ``speech_started`` and ``speech_stopped`` (``at``: where in the stream, seconds) and,
    after an utterance's finals, ``utterance``: every final of the utterance that ended at ``at`` has been
    sent, ``text`` is all of its confirmed text ("" when it had no words). A reader that knows only
    ``partial`` and ``final`` should skip other kinds: more may come."""

    kind: str
    text: str
    segment: Segment | None = None
    heard: float = 0.0
    at: float = 0.0


def _read(body: dict[str, Any]) -> float:
    """Seconds of the stream the worker had read when it sent this event."""
    return int(body.get("read", 0)) / SAMPLE_RATE


def _kept(body: dict[str, Any], acked: int) -> int:
    """How far the ring may be written over: to the worker's ``keep``, the audio a worker taking over
    from it would need (to ``read`` with a hub that does not say)."""
    return int(body.get("keep", body.get("read", acked)))


class _SessionCore:
    """A live session's protocol without I/O, shared by ``StreamSession`` and ``AsyncStreamSession``: the frames
    to send, what each message teaches, when the ring has room, and the errors. The two classes only wait."""

    def __init__(self, request_id: str, ring: shm.Ring | None, timeout: float) -> None:
        self.id, self.ring, self.timeout = request_id, ring, timeout
        self.audio = ChunkAudio()
        self.events: deque[StreamEvent] = deque()
        self.finals: list[Segment] = []
        self.acked = 0  # the ring may be written over before this sample: the worker's ``keep``
        self.worker: str | None = None  # the worker serving the session, once the open is answered
        self.resumes = 0  # times the session moved to another worker after its worker died
        self.transcript: Transcript | None = None
        self.error: HubError | None = None
        self.released = False  # the ring let go of and the client told: nothing more is sent

    @property
    def ended(self) -> bool:
        return self.transcript is not None or self.error is not None

    @property
    def over(self) -> bool:
        """Nothing more to send: the hub ended the session, or this side let go of it."""
        return self.ended or self.released

    def open(self, body: dict[str, Any]) -> list[bytes]:
        return protocol.build(MsgType.STREAM_OPEN, self.id, body)

    def opened(self) -> bool:
        """Whether a worker took the session; raises the hub's refusal."""
        if self.error is not None:
            raise self.error
        return self.worker is not None

    def handle(self, msg: Message) -> None:
        if msg.id != self.id or self.ended:  # ended: e.g. the hub refusing data sent before we read that it failed
            return
        if msg.type is MsgType.REPLY:  # the open answered, or the session moved to another worker
            self.worker = str(msg.body.get("worker"))
            self.resumes = int(msg.body.get("resumed", 0))
        elif msg.type is MsgType.PARTIAL:
            self.acked = _kept(msg.body, self.acked)
            self.events.append(StreamEvent("partial", str(msg.body.get("text", "")), heard=_read(msg.body)))
        elif msg.type is MsgType.SEGMENT:
            segment = Segment.from_dict(msg.body)
            self.acked = _kept(msg.body, self.acked)
            self.finals.append(segment)
            self.events.append(StreamEvent("final", segment.text, segment, _read(msg.body)))
        elif msg.type is MsgType.EVENT:
            self.acked = _kept(msg.body, self.acked)
            kind, text, at = (
                str(msg.body.get("kind", "")),
                str(msg.body.get("text", "")),
                float(msg.body.get("at", 0.0)),
            )
            self.events.append(StreamEvent(kind, text, heard=_read(msg.body), at=at))
        elif msg.type is MsgType.HEARD:  # nothing to show: how far the ring may be written over
            self.acked = _kept(msg.body, self.acked)
        elif msg.type is MsgType.RESULT:
            self.transcript = Transcript.from_dict(msg.body)
        elif msg.type is MsgType.ERROR:
            self.error = HubError.from_dict(msg.body)
            self.error.transcript = self.confirmed()  # type: ignore[attr-defined]

    def confirmed(self) -> Transcript:
        """The final text so far: what a session that failed still returns."""
        return Transcript(text=join_text(s.text for s in self.finals), segments=tuple(self.finals))

    def pieces(self, pcm: np.ndarray) -> list[np.ndarray]:
        """``pcm`` cut to what one STREAM_DATA may carry: half a ring, so that a piece fits once the worker has
        read the older half; inline, all of it."""
        step = self.ring.capacity // 2 if self.ring else pcm.size or 1
        return [pcm[start : start + step] for start in range(0, pcm.size, step)]

    def has_room(self, piece: np.ndarray) -> bool:
        """Whether ``piece`` may be sent now without overwriting audio the worker has not read; raises if the
        session is over."""
        self._check_open()
        return self.ring is None or self.ring.written + piece.size - self.acked <= self.ring.capacity

    def data(self, piece: np.ndarray) -> list[bytes]:
        """The STREAM_DATA for ``piece`` (written to the ring first, where there is one)."""
        if self.ring is None:
            return protocol.build(MsgType.STREAM_DATA, self.id, {}, piece.tobytes())
        return protocol.build(MsgType.STREAM_DATA, self.id, {"end": self.ring.write(piece)})

    def close_frames(self) -> list[bytes] | None:
        """The STREAM_CLOSE to send, unless the session is already over."""
        return None if self.over else protocol.build(MsgType.STREAM_CLOSE, self.id)

    def result(self) -> Transcript:
        """The final transcript; the session's error; or, for one its client let go of first, RuntimeError."""
        if self.error is not None:
            raise self.error
        if self.transcript is None:
            raise RuntimeError(CLOSED)
        return self.transcript

    def release(self) -> bool:
        """Let go of the ring; True the first time (the client then forgets the session)."""
        if self.released:
            return False
        self.released = True
        if self.ring is not None:
            self.ring.release()
        return True

    def behind(self) -> JobTimeout:
        """The full ring's error, the same on both clients: the worker has not read the oldest audio in time."""
        return JobTimeout(f"the worker fell more than {RING_SECONDS} s of audio behind for {self.timeout:.0f} s")

    def silent(self) -> JobTimeout:
        return JobTimeout(f"the hub did not answer the session within {self.timeout:.0f} s")

    def unsent(self) -> HubUnreachable:
        """A send that found no room for the session's timeout: the hub has taken none of what was queued.
        The session is over (nothing more can reach the hub); its error keeps the final text so far."""
        self.error = HubUnreachable(
            f"the hub took no message of this session for {self.timeout:.0f} s (about 1,000 are queued): "
            "it is stopped or unreachable"
        )
        self.error.transcript = self.confirmed()  # type: ignore[attr-defined]
        return self.error

    def _check_open(self) -> None:
        if self.released and not self.ended:
            raise RuntimeError(CLOSED)
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


def open_body(
    provider: str | None,
    options: dict[str, Any],
    ring: shm.Ring | None,
    timeout: float,
    turns: dict[str, Any] | None = None,
) -> dict[str, Any]:
    ring_ref = {"shm": ring.name, "capacity": ring.capacity} if ring else None
    routed = route_fields(options)
    body = {"provider": provider, "options": options, "ring": ring_ref, "timeout": timeout, **routed}
    return {**body, "turn_detection": dict(turns or {})}  # present, even empty: this client reads EVENT and HEARD


class _SessionView:
    """What both session classes show of their ``_SessionCore``, and how they let go of it."""

    _core: _SessionCore
    _on_close: Callable[[Any], None]

    @property
    def worker(self) -> str | None:
        """The id of the worker that holds the session."""
        return self._core.worker

    @property
    def resumes(self) -> int:
        """How many times the session moved to another worker because its worker died."""
        return self._core.resumes

    @property
    def transcript(self) -> Transcript:
        """The final transcript once closed; until then, the text confirmed so far."""
        return self._core.transcript or self._core.confirmed()

    def _release(self) -> None:
        """Let go of the ring (and, for ``StreamSession``, its socket) without a word to the hub: its sweep and
        timeouts do the rest."""
        if self._core.release():
            self._on_close(self)


class StreamSession(_SessionView):
    """A live session from ``HubClient.open_stream``; a context manager that closes itself.

    It has a socket of its own and waits on it with ``poll``; a lock lets one thread send while another reads."""

    def __init__(
        self,
        sock: zmq.Socket,
        request_id: str,
        ring: shm.Ring | None,
        timeout: float,
        on_close: Callable[[StreamSession], None],
    ) -> None:
        self.sock = sock
        # A send waits for room at most the session's timeout (a hub that takes nothing would hold it forever)
        sock.setsockopt(zmq.SNDTIMEO, max(1, int(timeout * 1000)))
        self._core = _SessionCore(request_id, ring, timeout)
        self._on_close = on_close
        self._lock = threading.Lock()

    def _start(self, body: dict[str, Any]) -> StreamSession:
        deadline = time.monotonic() + self._core.timeout
        with self._lock:
            try:
                self._send(self._core.open(body))
                while not self._core.opened():
                    self._core.handle(self._next(deadline))
            except HubError:
                self._release()
                raise
        return self

    def send(self, chunk: AudioInput, sample_rate: int | None = None) -> None:
        """Push a chunk of any size: float32 or int16 numpy, or raw 16-bit PCM bytes (16 kHz unless told;
        every chunk of a session at the same rate). Waits while the ring is full; ``JobTimeout`` if it stays
        full for the session's timeout."""
        self._send_pcm(self._core.audio.pcm(chunk, sample_rate))

    def _send_pcm(self, pcm: np.ndarray) -> None:
        for piece in self._core.pieces(pcm):
            deadline = time.monotonic() + self._core.timeout
            with self._lock:
                if not self._core.over:  # a session let go of has no socket any more
                    self._pump(0)
                while not self._core.has_room(piece):
                    if time.monotonic() >= deadline:
                        raise self._core.behind()
                    self._pump(POLL_MS)
                self._send(self._core.data(piece))

    def results(self) -> Iterator[StreamEvent]:
        """Events as they arrive, until the session is closed (by ``close`` or by the hub)."""
        while True:
            with self._lock:  # never held while waiting, or a sending thread would starve
                if not self._core.events and not self._core.over:
                    self._pump(0)
                event = self._core.events.popleft() if self._core.events else None
                over = self._core.over
            if event is not None:
                yield event
            elif over:
                if self._core.error is not None:
                    raise self._core.error
                return
            else:
                time.sleep(POLL_MS / 1000)

    def close(self) -> Transcript:
        """Flush: the worker decodes what is left and answers the final transcript. Safe to call twice."""
        if not self._core.over:
            self._send_pcm(self._core.audio.flush())
        with self._lock:
            try:
                if (frames := self._core.close_frames()) is not None:
                    self._send(frames)
                    deadline = time.monotonic() + self._core.timeout
                    while not self._core.ended:
                        self._core.handle(self._next(deadline))
            finally:
                self._release()
        return self._core.result()

    def __enter__(self) -> StreamSession:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        try:
            self.close()
        except HubError:
            if exc_type is None:
                raise

    def _send(self, frames: list[bytes]) -> None:
        try:
            self.sock.send_multipart(frames)
        except zmq.Again:
            raise self._core.unsent() from None

    def _next(self, deadline: float) -> Message:
        """The next message (for any request: ``handle`` drops others'), or JobTimeout at the deadline."""
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not self.sock.poll(max(1, int(remaining * 1000))):
            raise self._core.silent()
        return protocol.parse(self.sock.recv_multipart(), protocol.MAX_ANSWER_BODY_BYTES)

    def _pump(self, timeout_ms: int) -> None:
        """Take whatever has arrived (waiting up to ``timeout_ms`` for the first message)."""
        while self.sock.poll(timeout_ms):
            self._core.handle(protocol.parse(self.sock.recv_multipart(), protocol.MAX_ANSWER_BODY_BYTES))
            timeout_ms = 0


class AsyncStreamSession(_SessionView):
    """The asyncio twin of ``StreamSession``, from ``AsyncHubClient.open_stream``: its messages come through
    an inbox the client's reader task fills; a sender, a reader and ``close`` may wait at once."""

    def __init__(
        self,
        send: Callable[[list[bytes]], Any],
        inbox: asyncio.Queue[Message],
        request_id: str,
        ring: shm.Ring | None,
        timeout: float,
        on_close: Callable[[AsyncStreamSession], None],
    ) -> None:
        self._send_frames, self._inbox = send, inbox
        self.request_id = request_id
        self._core = _SessionCore(request_id, ring, timeout)
        self._on_close = on_close
        self._changed = asyncio.Event()  # set (and replaced) whenever a message has been taken in

    async def _start(self, body: dict[str, Any]) -> AsyncStreamSession:
        await self._send_frames(self._core.open(body))
        deadline = time.monotonic() + self._core.timeout
        try:
            while not self._core.opened():
                if not await self._await_change(deadline):
                    raise self._core.silent()
        except HubError:
            self._release()
            raise
        return self

    async def send(self, chunk: AudioInput, sample_rate: int | None = None) -> None:
        await self._send_pcm(self._core.audio.pcm(chunk, sample_rate))

    async def _send_pcm(self, pcm: np.ndarray) -> None:
        for piece in self._core.pieces(pcm):
            deadline = time.monotonic() + self._core.timeout
            self._drain()
            while not self._core.has_room(piece):
                if not await self._await_change(deadline):
                    raise self._core.behind()
            await self._send_frames(self._core.data(piece))

    async def results(self) -> AsyncIterator[StreamEvent]:
        while True:
            self._drain()
            if self._core.events:
                yield self._core.events.popleft()
                continue
            if self._core.over:
                if self._core.error is not None:
                    raise self._core.error
                return
            await self._await_change(None)

    async def close(self) -> Transcript:
        if not self._core.over:
            await self._send_pcm(self._core.audio.flush())
        try:
            if (frames := self._core.close_frames()) is not None:
                await self._send_frames(frames)
                deadline = time.monotonic() + self._core.timeout
                while not self._core.ended:
                    if not await self._await_change(deadline):
                        raise self._core.silent()
        finally:
            self._release()
        return self._core.result()

    async def __aenter__(self) -> AsyncStreamSession:
        return self

    async def __aexit__(self, exc_type: object, *exc: object) -> None:
        try:
            await self.close()
        except HubError:
            if exc_type is None:
                raise

    def _drain(self) -> None:
        while not self._inbox.empty():
            self._handle(self._inbox.get_nowait())

    def _handle(self, msg: Message) -> None:
        self._core.handle(msg)
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def _await_change(self, deadline: float | None) -> bool:
        """Take the next message, or wake when another task (a reader, a closer) took one; False at the deadline.

        A sender, a reader and ``close`` may all wait at once: whichever gets a message
        takes it into the shared state and wakes the others, so none waits for a message
        that another already consumed."""
        changed = self._changed
        getter = asyncio.ensure_future(self._take())
        waiter = asyncio.ensure_future(changed.wait())
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            done, _ = await asyncio.wait({getter, waiter}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            # also when this task is cancelled: a getter left behind would take (and lose) the next message
            waiter.cancel()
            getter.cancel()  # a queued message stays queued: Queue.get only removes it when it returns
        return bool(done)

    async def _take(self) -> None:
        """Take the next message in as soon as it leaves the inbox, in the same step: handled later (when the
        waiting task runs again), a sender's ``_drain`` could take the messages after it in first, and the
        session's events would come out of order."""
        self._handle(await self._inbox.get())
