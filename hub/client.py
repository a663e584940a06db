"""The client SDK: ``HubClient`` (blocking, thread-safe) and ``AsyncHubClient`` (asyncio).

On first use a client says HELLO. It proves that it shares the supervisor's
``/dev/shm`` by creating a small probe segment that the supervisor must read back; only
then does it pass PCM through shared memory (the supervisor forwards a descriptor, the
worker maps the segment). Otherwise, e.g. from another host, PCM travels inline.

Every call has a deadline: nothing blocks past ``timeout``, and a supervisor that is not
running gives ``HubUnreachable`` rather than a hang. This module imports only the
bottom layer, so a client never drags the supervisor in.

One client core, two transports: the request protocol is ``hub.call.Call`` (no I/O) and what
both clients know is ``_ClientCore``; ``HubClient`` waits with a ZeroMQ poller on a socket per
thread, ``AsyncHubClient`` with asyncio on one socket shared by all its requests. Each has one
``_exchange``, the only place it waits for a request's replies.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
import weakref
from collections.abc import AsyncGenerator, Callable, Generator, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message, recv_monitor_message

from hub import protocol, shm
from hub.audio import AudioInput
from hub.call import (
    HELLO_TIMEOUT,
    LINK_EVENTS,
    Call,
    CurveKeys,
    Lease,
    LinkState,
    Peer,
    ProbeLease,
    Reply,
    audio_lease,
    transcribe_body,
)
from hub.call import options as _options
from hub.errors import HubError, HubUnreachable, ProviderUnavailable
from hub.protocol import SAMPLE_RATE, Message, MsgType
from hub.results import Segment, Transcript
from hub.status import HubStatus, ReadyState
from hub.stream import RING_SECONDS, AsyncStreamSession, StreamEvent, StreamSession, open_body

__all__ = [
    "HubClient",
    "AsyncHubClient",
    "CurveKeys",
    "Transcript",
    "Segment",
    "TranscriptStream",
    "AsyncTranscriptStream",
    "StreamSession",
    "AsyncStreamSession",
    "StreamEvent",
    "HubPool",
    "AsyncHubPool",
]

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5555"
HEARTBEAT_MS, HEARTBEAT_TIMEOUT_MS = 1000, 3000  # ZMTP pings: a hub silent this long (a cut link) counts as disconnected


@dataclass(frozen=True)
class _Hello:
    hub_id: str
    shm: bool
    shm_prefix: str
    default_provider: str

    @staticmethod
    def from_dict(body: dict[str, Any]) -> _Hello:
        return _Hello(
            hub_id=str(body.get("hub_id", "")),
            shm=bool(body.get("shm")),
            shm_prefix=str(body.get("shm_prefix", "")),
            default_provider=str(body.get("default_provider", "")),
        )


def _not_ready(endpoint: str, timeout: float, status: HubStatus | None) -> HubError:
    if status is None:
        return Peer(endpoint).unreachable(timeout)
    if status.readiness is ReadyState.DRAINING:
        why = "it is draining (shutting down)"
    else:
        why = ", ".join(
            f"{name} ({p.serving} of {p.min_size} ready" + (f"; {p.pool.last_error}" if p.pool and p.pool.last_error else "") + ")"
            for name, p in status.short().items()
        )
    return ProviderUnavailable(f"the hub at {endpoint} answers but was not ready within {timeout:.0f} s: {why}")


class _Readiness:
    """``wait_ready``'s loop without its waiting: how long the next STATUS may take, and the error at the end."""

    PAUSE = 0.1  # between two STATUS answers that say "not ready"

    def __init__(self, endpoint: str, timeout: float) -> None:
        self.endpoint, self.timeout = endpoint, timeout
        self.deadline = time.monotonic() + timeout
        self.status: HubStatus | None = None

    def next_try(self) -> float | None:
        """The next STATUS's timeout; None once the time is up."""
        left = self.deadline - time.monotonic()
        return min(left, 2.0) if left > 0 else None

    def ready(self, status: dict[str, Any]) -> bool:
        self.status = HubStatus.from_dict(status)
        return self.status.ready

    def pause(self) -> float:
        return min(self.PAUSE, max(0.0, self.deadline - time.monotonic()))

    def failed(self) -> HubError:
        return _not_ready(self.endpoint, self.timeout, self.status)


def _socket(ctx: zmq.Context, endpoint: str, curve: CurveKeys | None) -> zmq.Socket:
    """A DEALER to the hub: no linger (a dead hub never holds up a close), ZMTP heartbeats, CURVE if given."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
    if curve is not None:
        curve.apply(sock)
    sock.connect(endpoint)
    return sock


class _ClientCore:
    """What both clients are, without I/O: settings, request ids, what the HELLO taught, and the ``Call``s.

    ``HubClient`` and ``AsyncHubClient`` add only their way of waiting (``_exchange``); a closed client of
    either kind raises ``RuntimeError`` at its next call.
    """

    def __init__(
        self,
        endpoint: str = DEFAULT_ENDPOINT,
        timeout: float = 60.0,
        *,
        use_shm: bool = True,
        curve: CurveKeys | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self.use_shm = use_shm
        self.curve = curve
        self._peer = Peer(endpoint, curve)
        self._ids = itertools.count(1)
        self._hello: _Hello | None = None
        self._segments: shm.SegmentPool | None = None
        self._closed = False
        self._open_transport()

    def _open_transport(self) -> None:
        """The client's sockets and locks: nothing connects to the hub yet."""
        raise NotImplementedError

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"this {type(self).__name__} is closed")

    def _deadline(self, timeout: float | None) -> float:
        return time.monotonic() + (timeout or self.timeout)

    def _new_id(self) -> str:
        return str(next(self._ids))

    def _call(self, kind: MsgType, body: dict[str, Any], deadline: float, lease: Lease | None = None) -> Call:
        self._check_open()
        return Call(kind, self._new_id(), body, deadline, self._peer, lease)

    def _hello_call(self, deadline: float) -> Call:
        return self._call(MsgType.HELLO, {}, min(deadline, time.monotonic() + HELLO_TIMEOUT), ProbeLease())

    def _hello_busy(self, deadline: float) -> HubError:
        """For a call that waited its whole time while another did the HELLO, which did not get an answer."""
        return self._peer.unreachable(max(0.0, deadline - time.monotonic()))

    def _greeted(self, reply: Reply) -> _Hello:
        assert isinstance(reply, dict)
        hello = _Hello.from_dict(reply)
        self._segments = shm.SegmentPool(hello.shm_prefix) if self.use_shm and hello.shm else None
        if self._segments is not None:
            weakref.finalize(self, self._segments.close)  # a client never closed still leaves no segment
        self._hello = hello
        return hello

    def _transcribe_call(
        self, audio: AudioInput, provider: str | None, options: dict[str, Any], deadline: float, sample_rate: int | None, stream: bool
    ) -> Call:
        lease = audio_lease(audio, sample_rate, self._segments)  # bad audio fails here, before anything is sent
        return self._call(MsgType.TRANSCRIBE, transcribe_body(provider, options, stream, deadline), deadline, lease)

    def _session_ring(self, hello: _Hello) -> shm.Ring | None:
        return shm.Ring(hello.shm_prefix, RING_SECONDS * SAMPLE_RATE) if self.use_shm and hello.shm else None

    def _close_segments(self) -> None:
        if self._segments is not None:
            self._segments.close()


class TranscriptStream:
    """``HubClient.transcribe_stream``'s answer. Iterating it yields each ``Segment`` as it is decoded;
    ``transcript`` holds the final ``Transcript`` afterwards. ``events()`` yields the same segments and then
    the ``Transcript`` as its last item: the sequence ``AsyncHubClient.transcribe_stream`` yields."""

    transcript: Transcript | None = None

    def __init__(self, events: Generator[Reply, None, None]) -> None:
        self._events = events

    def events(self) -> Iterator[Segment | Transcript]:
        try:
            for event in self._events:
                assert isinstance(event, (Segment, Transcript))
                if isinstance(event, Transcript):
                    self.transcript = event
                yield event
        finally:
            self._events.close()  # left early (a break): the request is cancelled now, not when collected

    def __iter__(self) -> Iterator[Segment]:
        for event in self.events():
            if isinstance(event, Segment):
                yield event

    def _final(self) -> Transcript:
        for _ in self.events():
            pass
        assert self.transcript is not None
        return self.transcript


class AsyncTranscriptStream:
    """``AsyncHubClient.transcribe_stream``'s answer: an async iterator of each ``Segment``, then the final
    ``Transcript`` as its last item; ``transcript`` holds that too once it came, as on ``TranscriptStream``."""

    transcript: Transcript | None = None

    def __init__(self, events: AsyncGenerator[Reply, None]) -> None:
        self._events = events

    def __aiter__(self) -> AsyncTranscriptStream:
        return self

    async def __anext__(self) -> Segment | Transcript:
        event = await self._events.__anext__()
        assert isinstance(event, (Segment, Transcript))
        if isinstance(event, Transcript):
            self.transcript = event
        return event

    async def aclose(self) -> None:
        """Stop listening: a request still in flight is cancelled on the hub."""
        await self._events.aclose()

    async def _final(self) -> Transcript:
        async for _ in self:
            pass
        assert self.transcript is not None
        return self.transcript


class _Link:
    """A sync socket's monitor and the ``LinkState`` it feeds, read between polls."""

    def __init__(self, sock: zmq.Socket) -> None:
        self.monitor = sock.get_monitor_socket(LINK_EVENTS)
        self.state = LinkState()

    def update(self, timeout_ms: int = 0) -> bool:
        """Take the pending events (waiting up to ``timeout_ms`` for the first); True if a close was among them."""
        closed = False
        while self.monitor.poll(timeout_ms):
            event = recv_monitor_message(self.monitor)
            closed = self.state.take(event["event"], event["value"]) or closed
            timeout_ms = 0
        return closed

    def wait_up(self, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while self.state.down and (left := deadline - time.monotonic()) > 0:
            self.update(int(left * 1000) + 1)
        return not self.state.down


class HubClient(_ClientCore):
    """A blocking client; one instance may be shared by many threads (each gets its own socket, and the
    first HELLO is said once, under a lock)."""

    def _open_transport(self) -> None:
        self._ctx = zmq.Context()
        self._local = threading.local()
        self._sockets: list[zmq.Socket] = []
        self._lock = threading.Lock()
        self._hello_lock = threading.Lock()
        self._streams: set[StreamSession] = set()

    def __enter__(self) -> HubClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close every socket; sessions still open let go of their rings (the hub times them out). Safe to
        call twice."""
        if self._closed:
            return
        for session in list(self._streams):
            session._release()
        with self._lock:
            self._closed = True
            for sock in self._sockets:
                sock.close(linger=0)
            self._sockets.clear()
        self._close_segments()
        self._ctx.term()

    # --- public calls ---------------------------------------------------------------

    def transcribe(
        self,
        audio: AudioInput,
        provider: str | None = None,
        *,
        language: str | None = None,
        beam_size: int | None = None,
        timeout: float | None = None,
        sample_rate: int | None = None,
        **options: Any,
    ) -> Transcript:
        """Transcribe a file path, a numpy array (float32 or int16) or raw 16-bit PCM bytes."""
        return self._stream(audio, provider, _options(language, beam_size, options), timeout, sample_rate, False)._final()

    def transcribe_stream(
        self,
        audio: AudioInput,
        provider: str | None = None,
        *,
        language: str | None = None,
        beam_size: int | None = None,
        timeout: float | None = None,
        sample_rate: int | None = None,
        **options: Any,
    ) -> TranscriptStream:
        """Like ``transcribe``, but yields each segment as soon as the worker has decoded it."""
        return self._stream(audio, provider, _options(language, beam_size, options), timeout, sample_rate, True)

    def _stream(
        self, audio: AudioInput, provider: str | None, options: dict[str, Any], timeout: float | None, sample_rate: int | None, stream: bool
    ) -> TranscriptStream:
        deadline = self._deadline(timeout)
        self._ensure_hello(deadline)
        return TranscriptStream(self._exchange(self._transcribe_call(audio, provider, options, deadline, sample_rate, stream)))

    def open_stream(
        self,
        provider: str | None = None,
        *,
        language: str | None = None,
        timeout: float | None = None,
        turn_detection: dict[str, Any] | None = None,
        **options: Any,
    ) -> StreamSession:
        """Open a live session: ``send`` chunks as they are captured, read ``results()``, ``close()`` for the
        final transcript. It shares a worker with other sessions; ``POOL_BUSY`` past ``pool.max_sessions``.
        ``turn_detection`` overrides the provider's ``stream.vad``, ``stream.endpoint_ms`` and
        ``stream.vad_threshold`` for this session, e.g. ``{"vad": True, "endpoint_ms": 500}``."""
        timeout = timeout or self.timeout
        ring = self._session_ring(self._ensure_hello(self._deadline(timeout)))
        session = StreamSession(self._new_socket(), self._new_id(), ring, timeout, self._forget_stream)
        with self._lock:
            self._streams.add(session)
        return session._start(open_body(provider, _options(language, None, options), ring, timeout, turn_detection))

    def status(self, timeout: float | None = None) -> dict[str, Any]:
        """The supervisor's view of every provider and worker, as the wire's dict (docs/operations/pool_monitoring.md
        names the fields); ``hub.status.HubStatus.from_dict`` reads it as typed values."""
        return self._request(MsgType.STATUS, {}, timeout)

    def scale(self, provider: str, size: int, timeout: float | None = None) -> dict[str, Any]:
        """Set a provider's size at run time, within its [min_size, max_size]; autoscaling keeps it as a floor."""
        return self._request(MsgType.SCALE, {"provider": provider, "size": size}, timeout)

    def route(self, route: str, weights: dict[str, float], timeout: float | None = None) -> dict[str, Any]:
        """Set a route's weights at run time (providers of the route left out get 0): ``{"whisper-v1": 100}``
        is the instant rollback. Clears a rollback the analysis made; returns the weights now in force."""
        return self._request(MsgType.ROUTE, {"route": route, "weights": dict(weights)}, timeout)

    def wait_ready(self, timeout: float = 60.0) -> dict[str, Any]:
        """Block until the hub is ready (every enabled provider has its ``min_size`` workers, and it is not
        draining: ``HubStatus.ready``); return the status.
        ``HubUnreachable`` if no hub answered, ``ProviderUnavailable`` if it answered but was not ready."""
        wait = _Readiness(self.endpoint, timeout)
        while (left := wait.next_try()) is not None:
            try:
                status = self.status(timeout=left)
            except HubUnreachable:
                continue
            if wait.ready(status):
                return status
            time.sleep(wait.pause())
        raise wait.failed()

    # --- plumbing -------------------------------------------------------------------

    def _request(self, kind: MsgType, body: dict[str, Any], timeout: float | None) -> dict[str, Any]:
        """One request with one REPLY."""
        deadline = self._deadline(timeout)
        self._ensure_hello(deadline)
        (reply,) = self._exchange(self._call(kind, body, deadline))
        return reply  # type: ignore[return-value]

    def _ensure_hello(self, deadline: float) -> _Hello:
        """What the hub said to this client's HELLO, said once (every call comes here first)."""
        self._check_open()
        if self._hello is not None:
            return self._hello
        if not self._hello_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise self._hello_busy(deadline)
        try:
            if self._hello is not None:
                return self._hello
            (reply,) = self._exchange(self._hello_call(deadline))
            return self._greeted(reply)
        finally:
            self._hello_lock.release()

    def _exchange(self, call: Call) -> Generator[Reply, None, None]:
        """Drive ``call`` on this thread's socket, waiting with a poller for its replies or a close of its link."""
        sock, link = self._socket()
        try:
            link.update()
            if link.state.down and not link.wait_up(call.grace()):
                raise call.lost(link.state, sent=False)
            _send_in_time(sock, link, call)
            poller = zmq.Poller()
            poller.register(sock, zmq.POLLIN)
            poller.register(link.monitor, zmq.POLLIN)
            while not call.over:
                left = call.left()
                ready = dict(poller.poll(max(1, int(left * 1000)))) if left > 0 else {}
                if link.monitor in ready and link.update():
                    raise call.lost(link.state)
                if sock in ready:
                    if (reply := call.receive(protocol.parse(sock.recv_multipart()))) is not None:
                        yield reply
                elif call.left() <= 0:
                    raise call.expire()
        finally:
            _send_quietly(partial(sock.send_multipart, flags=zmq.NOBLOCK), call.finish())

    def _socket(self) -> tuple[zmq.Socket, _Link]:
        """This thread's socket for one-shot calls, and what its monitor says of its connection."""
        self._check_open()
        pair = getattr(self._local, "pair", None)
        if pair is None:
            sock = self._new_socket()
            link = _Link(sock)
            with self._lock:
                self._sockets.insert(0, link.monitor)  # closed before its socket
            pair = self._local.pair = (sock, link)
        return pair  # type: ignore[no-any-return]

    def _new_socket(self) -> zmq.Socket:
        with self._lock:
            self._check_open()
            sock = _socket(self._ctx, self.endpoint, self.curve)
            self._sockets.append(sock)
        return sock

    def _forget_stream(self, session: StreamSession) -> None:
        with self._lock:
            self._streams.discard(session)
            if session.sock in self._sockets:
                self._sockets.remove(session.sock)
                session.sock.close(linger=0)


def _send_in_time(sock: zmq.Socket, link: _Link, call: Call) -> None:
    """Send ``call``'s request once the socket has room, before its deadline.

    A handshake that fails on a protocol error (a client without keys meeting a CURVE hub) ends the socket's
    only connection for good, and a DEALER without a connection has no room: a plain send would wait forever.
    """
    frames = call.request()
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLOUT)
    poller.register(link.monitor, zmq.POLLIN)
    while True:
        try:
            sock.send_multipart(frames, flags=zmq.NOBLOCK)
            return
        except zmq.Again:
            link.update()
        if (error := call.unsendable(link.state)) is not None:
            raise error
        poller.poll(max(1, int(call.left() * 1000)))


def _send_quietly(send: Callable[[list[bytes]], Any], frames: list[bytes] | None) -> None:
    """Send a CANCEL without waiting for it; a socket closed meanwhile (the client closing) is no error:
    the hub then sees the connection go."""
    if frames is not None:
        try:
            send(frames)
        except zmq.ZMQError:
            pass


class AsyncHubClient(_ClientCore):
    """The same calls as coroutines, on one socket: hundreds of requests can share one event loop. A reader
    task routes every reply to its request's inbox; the first HELLO is said once, under a lock."""

    def _open_transport(self) -> None:
        self._ctx = zmq.asyncio.Context()
        self._sock = _socket(self._ctx, self.endpoint, self.curve)
        self._monitor = self._sock.get_monitor_socket(LINK_EVENTS)
        self._link = LinkState()
        self._pending: dict[str, asyncio.Queue[Message]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._hello_lock = asyncio.Lock()
        self._streams: set[AsyncStreamSession] = set()

    async def __aenter__(self) -> AsyncHubClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the socket and the reader task; sessions still open let go of their rings. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for session in list(self._streams):
            session._release()
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except asyncio.CancelledError:
                pass
            self._reader = None
        self._monitor.close(linger=0)
        self._sock.close(linger=0)
        self._close_segments()
        self._ctx.term()

    async def transcribe(
        self,
        audio: AudioInput,
        provider: str | None = None,
        *,
        language: str | None = None,
        beam_size: int | None = None,
        timeout: float | None = None,
        sample_rate: int | None = None,
        **options: Any,
    ) -> Transcript:
        """The coroutine twin of ``HubClient.transcribe``."""
        return await self._stream(audio, provider, _options(language, beam_size, options), timeout, sample_rate, False)._final()

    def transcribe_stream(
        self,
        audio: AudioInput,
        provider: str | None = None,
        *,
        language: str | None = None,
        beam_size: int | None = None,
        timeout: float | None = None,
        sample_rate: int | None = None,
        **options: Any,
    ) -> AsyncTranscriptStream:
        """Yields each ``Segment`` as it is decoded, then the final ``Transcript``."""
        return self._stream(audio, provider, _options(language, beam_size, options), timeout, sample_rate, True)

    def _stream(
        self, audio: AudioInput, provider: str | None, options: dict[str, Any], timeout: float | None, sample_rate: int | None, stream: bool
    ) -> AsyncTranscriptStream:
        async def events() -> AsyncGenerator[Reply, None]:
            deadline = self._deadline(timeout)
            await self._ensure_hello(deadline)
            async for reply in self._exchange(self._transcribe_call(audio, provider, options, deadline, sample_rate, stream)):
                yield reply

        return AsyncTranscriptStream(events())

    async def open_stream(
        self,
        provider: str | None = None,
        *,
        language: str | None = None,
        timeout: float | None = None,
        turn_detection: dict[str, Any] | None = None,
        **options: Any,
    ) -> AsyncStreamSession:
        """The coroutine twin of ``HubClient.open_stream``."""
        timeout = timeout or self.timeout
        ring = self._session_ring(await self._ensure_hello(self._deadline(timeout)))
        request_id = self._new_id()
        session = AsyncStreamSession(self._sock.send_multipart, self._inbox(request_id), request_id, ring, timeout, self._forget_stream)
        self._streams.add(session)
        return await session._start(open_body(provider, _options(language, None, options), ring, timeout, turn_detection))

    def _forget_stream(self, session: AsyncStreamSession) -> None:
        self._streams.discard(session)
        self._pending.pop(session.request_id, None)

    async def status(self, timeout: float | None = None) -> dict[str, Any]:
        """The coroutine twin of ``HubClient.status``."""
        return await self._request(MsgType.STATUS, {}, timeout)

    async def wait_ready(self, timeout: float = 60.0) -> dict[str, Any]:
        """The coroutine twin of ``HubClient.wait_ready``."""
        wait = _Readiness(self.endpoint, timeout)
        while (left := wait.next_try()) is not None:
            try:
                status = await self.status(timeout=left)
            except HubUnreachable:
                continue
            if wait.ready(status):
                return status
            await asyncio.sleep(wait.pause())
        raise wait.failed()

    async def scale(self, provider: str, size: int, timeout: float | None = None) -> dict[str, Any]:
        """The coroutine twin of ``HubClient.scale``."""
        return await self._request(MsgType.SCALE, {"provider": provider, "size": size}, timeout)

    async def route(self, route: str, weights: dict[str, float], timeout: float | None = None) -> dict[str, Any]:
        """The coroutine twin of ``HubClient.route``."""
        return await self._request(MsgType.ROUTE, {"route": route, "weights": dict(weights)}, timeout)

    async def _request(self, kind: MsgType, body: dict[str, Any], timeout: float | None) -> dict[str, Any]:
        deadline = self._deadline(timeout)
        await self._ensure_hello(deadline)
        (reply,) = [reply async for reply in self._exchange(self._call(kind, body, deadline))]
        return reply  # type: ignore[return-value]

    async def _ensure_hello(self, deadline: float) -> _Hello:
        """What the hub said to this client's HELLO, said once (every call comes here first)."""
        self._check_open()
        if self._hello is not None:
            return self._hello
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                await self._hello_lock.acquire()
        except TimeoutError:
            raise self._hello_busy(deadline) from None
        try:
            if self._hello is not None:
                return self._hello
            (reply,) = [reply async for reply in self._exchange(self._hello_call(deadline))]
            return self._greeted(reply)
        finally:
            self._hello_lock.release()

    async def _exchange(self, call: Call) -> AsyncGenerator[Reply, None]:
        """Drive ``call`` on the shared socket: the reader task puts its replies in its inbox, and an ERROR
        there when the connection closes."""
        inbox = self._inbox(call.id)
        try:
            grace = time.monotonic() + call.grace()
            while self._link.down and time.monotonic() < grace:
                await asyncio.sleep(0.05)
            if self._link.down:
                raise call.lost(self._link, sent=False)
            await self._send_in_time(call)
            while not call.over:
                try:
                    async with asyncio.timeout(call.left()):  # no task per wait, unlike wait_for
                        msg = await inbox.get()
                except TimeoutError:
                    raise call.expire() from None
                if (reply := call.receive(msg)) is not None:
                    yield reply
        finally:
            self._pending.pop(call.id, None)
            # expired, or its caller stopped listening (a cancelled task cannot wait: fire and forget)
            _send_quietly(self._sock.send_multipart, call.finish())

    async def _send_in_time(self, call: Call) -> None:
        """``_send_in_time``'s twin: a socket whose connection ended on a protocol error has no room, and
        waiting for it would never end (the reader task marks a refusal on the link meanwhile)."""
        frames = call.request()
        while True:
            try:
                await self._sock.send_multipart(frames, flags=zmq.NOBLOCK)
                return
            except zmq.Again:
                pass
            if (error := call.unsendable(self._link)) is not None:
                raise error
            await asyncio.sleep(min(0.05, call.left()))

    def _inbox(self, request_id: str) -> asyncio.Queue[Message]:
        """The queue ``request_id``'s replies are routed to (starting the reader on first use)."""
        self._check_open()
        if self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(self._read_loop())
        inbox: asyncio.Queue[Message] = asyncio.Queue()
        self._pending[request_id] = inbox
        return inbox

    async def _read_loop(self) -> None:
        """Route replies to their requests; when the connection closes, fail every request in flight."""
        poller = zmq.asyncio.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        while True:
            ready = dict(await poller.poll())
            if self._monitor in ready:
                event = parse_monitor_message(await self._monitor.recv_multipart())
                if self._link.take(event["event"], event["value"]):
                    gone = self._peer.lost(self._link).to_dict()
                    for request_id, inbox in list(self._pending.items()):
                        inbox.put_nowait(Message(MsgType.ERROR, request_id, gone))
            if self._sock in ready:
                self._take_replies()

    def _take_replies(self) -> None:
        """Every reply already received, without a trip through the event loop for each."""
        while True:
            try:
                frames = self._sock.recv_multipart(zmq.NOBLOCK).result()  # a done future: DONTWAIT short-circuits
            except zmq.Again:
                return
            try:
                msg = protocol.parse(frames)
            except HubError:
                continue
            inbox = self._pending.get(msg.id)
            if inbox is not None:
                inbox.put_nowait(msg)


def __getattr__(name: str) -> Any:
    """``HubPool``/``AsyncHubPool`` live in ``hub.balance``, which imports this module: loaded on first use."""
    if name in ("HubPool", "AsyncHubPool"):
        from hub import balance

        return getattr(balance, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    import sys

    from hub.cli import main

    sys.exit(main())
