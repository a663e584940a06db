"""The client SDK: ``HubClient`` (blocking, thread-safe) and ``AsyncHubClient`` (asyncio).

On first use a client says HELLO. It proves that it shares the supervisor's
``/dev/shm`` by creating a small probe segment that the supervisor must read back; only
then does it pass PCM through shared memory (the supervisor forwards a descriptor, the
worker maps the segment). Otherwise, e.g. from another host, PCM travels inline.

Every call has a deadline: nothing blocks past ``timeout``, and a supervisor that is not
running gives ``HubUnreachable`` rather than a hang. This module imports only the
bottom layer, so a client never drags the supervisor in.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
import weakref
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import zmq
import zmq.asyncio
import zmq.auth
from zmq.utils.monitor import parse_monitor_message, recv_monitor_message

from hub import protocol, shm
from hub.audio import AudioInput, to_pcm
from hub.errors import AuthFailed, HubError, HubUnreachable, JobTimeout, ProviderUnavailable
from hub.protocol import SAMPLE_RATE, Message, MsgType
from hub.results import Segment, Transcript
from hub.stream import (
    RING_SECONDS,
    AsyncStreamSession,
    StreamEvent,
    StreamSession,
    open_body,
    route_fields,
)

__all__ = [
    "HubClient",
    "AsyncHubClient",
    "CurveKeys",
    "Transcript",
    "Segment",
    "TranscriptStream",
    "StreamSession",
    "AsyncStreamSession",
    "StreamEvent",
    "HubPool",
    "AsyncHubPool",
]

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5555"


@dataclass(frozen=True)
class _Hello:
    hub_id: str
    shm: bool
    shm_prefix: str
    default_provider: str


@dataclass
class _Prepared:
    """A TRANSCRIBE request: audio already converted (so bad input fails at the call), its shared-memory
    segment leased from the client's pool only when the request is sent, and given back once it is answered."""

    body: dict[str, Any]
    pcm: np.ndarray
    segments: shm.SegmentPool | None  # None: the PCM travels inline
    segment: shm.PcmSegment | None = None

    def open(self) -> bytes | None:
        """Describe the audio in the body; return the inline payload, or None when it went to shared memory."""
        if self.segments is None:
            self.body["audio"] = {"samples": int(self.pcm.size)}
            return self.pcm.tobytes()
        self.segment = self.segments.lease(self.pcm)
        self.body["audio"] = {"samples": int(self.pcm.size), "shm": self.segment.name}
        return None

    def release(self, reusable: bool) -> None:
        """``reusable``: the request was answered, so no worker reads the segment any more."""
        if self.segment is not None and self.segments is not None:
            self.segments.give_back(self.segment, reusable)


def _options(language: str | None, beam_size: int | None, options: dict[str, Any]) -> dict[str, Any]:
    extra = {"language": language, "beam_size": beam_size}
    return {**options, **{k: v for k, v in extra.items() if v is not None}}


def _prepare(
    segments: shm.SegmentPool | None,
    audio: AudioInput,
    provider: str | None,
    options: dict[str, Any],
    stream: bool,
    deadline: float,
    sample_rate: int | None,
) -> _Prepared:
    pcm = to_pcm(audio, sample_rate)
    timeout = max(0.001, deadline - time.monotonic())  # the supervisor gives up when the client would
    body: dict[str, Any] = {"provider": provider, "options": options, "stream": stream, "timeout": timeout}
    body.update(route_fields(options))
    return _Prepared(body, pcm, segments)


def _segment_pool(hello: _Hello, use_shm: bool) -> shm.SegmentPool | None:
    return shm.SegmentPool(hello.shm_prefix) if use_shm and hello.shm else None


def _answered(exc: BaseException | None) -> bool:
    """Whether a request that ended with ``exc`` (None: normally) got its final reply: only then may its
    segment be reused. A timeout or a lost hub leaves it possibly queued or on a worker."""
    return exc is None or (isinstance(exc, HubError) and not isinstance(exc, (JobTimeout, HubUnreachable)))


def _route_body(route: str, weights: dict[str, float]) -> dict[str, Any]:
    return {"route": route, "weights": dict(weights)}


def _hello_body() -> tuple[dict[str, Any], shm.PcmSegment]:
    probe, nonce = shm.create_probe()
    return {"probe": probe.name, "nonce": nonce}, probe


def _read_hello(body: dict[str, Any]) -> _Hello:
    return _Hello(
        hub_id=str(body.get("hub_id", "")),
        shm=bool(body.get("shm")),
        shm_prefix=str(body.get("shm_prefix", "")),
        default_provider=str(body.get("default_provider", "")),
    )


def _interpret(msg: Message) -> Segment | Transcript | dict[str, Any]:
    """A reply as a value: a streamed segment, the final transcript, a REPLY body; ERROR raises."""
    if msg.type is MsgType.ERROR:
        raise HubError.from_dict(msg.body)
    if msg.type is MsgType.SEGMENT:
        return Segment.from_dict(msg.body)
    if msg.type is MsgType.RESULT:
        return Transcript.from_dict(msg.body)
    return msg.body


@dataclass(frozen=True)
class CurveKeys:
    """What a client needs to talk to a hub that uses CURVE: its own key pair and the server's public key."""

    public: bytes
    secret: bytes
    server: bytes

    @staticmethod
    def load(client_secret_file: str, server_public_file: str) -> CurveKeys:
        """Read the files ``python -m hub.keys`` writes: the client's ``.key_secret`` and the server's ``.key``."""
        public, secret = zmq.auth.load_certificate(client_secret_file)
        server, _ = zmq.auth.load_certificate(server_public_file)
        if secret is None:
            raise ValueError(f"{client_secret_file} holds no secret key; pass the .key_secret file")
        return CurveKeys(public, secret, server)

    def apply(self, sock: zmq.Socket) -> None:
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret
        sock.curve_serverkey = self.server


def _unreachable(endpoint: str, waited: float) -> HubUnreachable:
    return HubUnreachable(
        f"no ASR Hub answered at {endpoint} within {waited:.1f} s; "
        "is `python -m hub.supervisor` running there, and is the endpoint right?"
    )


def _not_ready(endpoint: str, timeout: float, status: dict[str, Any] | None) -> HubError:
    if status is None:
        return _unreachable(endpoint, timeout)
    short = [
        f"{name} ({sum(w['state'] in ('idle', 'busy') for w in p['workers'])} of {p['min_size']} ready"
        + (f"; {p['last_error']}" if p.get("last_error") else "") + ")"
        for name, p in status["providers"].items()
        if p["enabled"] and sum(w["state"] in ("idle", "busy") for w in p["workers"]) < p["min_size"]
    ]
    return ProviderUnavailable(f"the hub at {endpoint} answers but was not ready within {timeout:.0f} s: " + ", ".join(short))


def _refused(endpoint: str, curve: CurveKeys | None) -> AuthFailed:
    if curve is None:
        return AuthFailed(
            f"the hub at {endpoint} refused this client in the handshake: it requires CURVE keys (hub.curve) and "
            "this client has none; pass curve=CurveKeys.load(...) (or --client-key and --server-key)"
        )
    return AuthFailed(
        f"the hub at {endpoint} refused this client in the CURVE handshake (server key {curve.server.decode()}, "
        f"client public key {curve.public.decode()}): the client's public key is not in the hub's "
        "hub.curve.allowed_clients folder, or the server key is not that hub's"
    )


def _lost(endpoint: str, curve: CurveKeys | None, refused: bool) -> HubError:
    """Why the connection closed: the hub refused our key, or it stopped."""
    return _refused(endpoint, curve) if refused else _gone(endpoint)


def _gone(endpoint: str) -> HubUnreachable:
    return HubUnreachable(
        f"the connection to the hub at {endpoint} closed while the request was in flight: the supervisor "
        "stopped or restarted; retry once it is back"
    )


AUTH_EVENTS = zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
LINK_EVENTS = zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED | AUTH_EVENTS | zmq.EVENT_HANDSHAKE_SUCCEEDED
HEARTBEAT_MS, HEARTBEAT_TIMEOUT_MS = 1000, 3000  # ZMTP pings: a hub silent this long (a cut link) counts as disconnected


def _heartbeat(sock: zmq.Socket) -> None:
    sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
RECONNECT_GRACE = 1.0  # seconds a request waits for a closed connection to come back before giving up


class _Handshake:
    """Whether the hub refused this client's key, from the socket's handshake events.

    A handshake that fails with no detail is how a wrong server key shows, but also how a hub that stops in
    mid-handshake (a drain, a crash) shows. It counts as a refusal only until a handshake has succeeded: a hub
    that accepted this client's key once and then fails one is, in practice, going away, and the request lost
    with it is HUB_UNREACHABLE (a pool retries it on another hub), not AUTH_FAILED (final).
    """

    __slots__ = ("accepted", "refused")

    def __init__(self) -> None:
        self.accepted = False
        self.refused = False

    def take(self, event: int) -> bool:
        """Account for ``event`` if it is a handshake's outcome; False for any other event."""
        if not event & (AUTH_EVENTS | zmq.EVENT_HANDSHAKE_SUCCEEDED):
            return False
        if event & zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self.accepted, self.refused = True, False
        else:
            self.refused = bool(event & zmq.EVENT_HANDSHAKE_FAILED_AUTH) or not self.accepted
        return True


class _Link:
    """A socket's connection state, read from its monitor: known down after a close until it reconnects."""

    def __init__(self, sock: zmq.Socket) -> None:
        self.monitor = sock.get_monitor_socket(LINK_EVENTS)
        self.down = False
        self.handshake = _Handshake()

    def update(self, timeout_ms: int = 0) -> bool:
        """Take the pending events (waiting up to ``timeout_ms`` for the first); True if a close was among them."""
        closed = False
        while self.monitor.poll(timeout_ms):
            event = recv_monitor_message(self.monitor)["event"]
            timeout_ms = 0
            if self.handshake.take(event):
                continue
            closed = closed or event == zmq.EVENT_DISCONNECTED
            self.down = event == zmq.EVENT_DISCONNECTED
        return closed

    def wait_up(self, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while self.down and (left := deadline - time.monotonic()) > 0:
            self.update(int(left * 1000) + 1)
        return not self.down


def _timed_out(waited: float) -> JobTimeout:
    return JobTimeout(f"no answer within {waited:.1f} s (the client's timeout); the request was cancelled")


class TranscriptStream:
    """Iterate it for segments as the worker decodes them; ``transcript`` holds the totals afterwards."""

    def __init__(self, events: Iterator[Segment | Transcript]) -> None:
        self._events = events
        self.transcript: Transcript | None = None

    def __iter__(self) -> Iterator[Segment]:
        for event in self._events:
            if isinstance(event, Transcript):
                self.transcript = event
            else:
                yield event


class HubClient:
    """A blocking client; one instance may be shared by many threads (each gets its own socket)."""

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
        self._ctx = zmq.Context()
        self._local = threading.local()
        self._sockets: list[zmq.Socket] = []
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._hello: _Hello | None = None
        self._segments: shm.SegmentPool | None = None
        self._closed = False
        self._streams: set[StreamSession] = set()

    def __enter__(self) -> HubClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close every socket; sessions still open let go of their rings (the hub times them out)."""
        for session in list(self._streams):
            session._release()
        with self._lock:
            self._closed = True
            for sock in self._sockets:
                sock.close(linger=0)
            self._sockets.clear()
        if self._segments is not None:
            self._segments.close()
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
        stream = self._start(audio, provider, _options(language, beam_size, options), timeout, sample_rate, stream=False)
        for _ in stream:
            pass
        assert stream.transcript is not None
        return stream.transcript

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
        return self._start(audio, provider, _options(language, beam_size, options), timeout, sample_rate, stream=True)

    def _start(
        self,
        audio: AudioInput,
        provider: str | None,
        options: dict[str, Any],
        timeout: float | None,
        sample_rate: int | None,
        stream: bool,
    ) -> TranscriptStream:
        deadline = time.monotonic() + (timeout or self.timeout)
        self._ensure_hello(deadline)
        prepared = _prepare(self._segments, audio, provider, options, stream, deadline, sample_rate)
        return TranscriptStream(self._events(prepared, deadline))

    def open_stream(
        self, provider: str | None = None, *, language: str | None = None, timeout: float | None = None, **options: Any
    ) -> StreamSession:
        """Open a live session: ``send`` chunks as they are captured, read ``results()``, ``close()`` for the
        final transcript. It shares a worker with other sessions; ``POOL_BUSY`` past ``pool.max_sessions``."""
        timeout = timeout or self.timeout
        hello = self._ensure_hello(time.monotonic() + timeout)
        ring = shm.Ring(hello.shm_prefix, RING_SECONDS * SAMPLE_RATE) if self.use_shm and hello.shm else None
        session = StreamSession(self._new_socket(), str(next(self._ids)), ring, timeout, self._forget_stream)
        with self._lock:
            self._streams.add(session)
        return session._start(open_body(provider, _options(language, None, options), ring, timeout))

    def status(self, timeout: float | None = None) -> dict[str, Any]:
        """The supervisor's view of every provider and worker (see the README for the fields)."""
        return self._request(MsgType.STATUS, {}, timeout)

    def scale(self, provider: str, size: int, timeout: float | None = None) -> dict[str, Any]:
        """Set a provider's size at run time, within its [min_size, max_size]; autoscaling keeps it as a floor."""
        return self._request(MsgType.SCALE, {"provider": provider, "size": size}, timeout)

    def route(self, route: str, weights: dict[str, float], timeout: float | None = None) -> dict[str, Any]:
        """Set a route's weights at run time (providers of the route left out get 0): ``{"whisper-v1": 100}``
        is the instant rollback. Clears a rollback the analysis made; returns the weights now in force."""
        return self._request(MsgType.ROUTE, _route_body(route, weights), timeout)

    def wait_ready(self, timeout: float = 60.0) -> dict[str, Any]:
        """Block until every enabled provider has its ``min_size`` workers ready; return the status.
        ``HubUnreachable`` if no hub answered, ``ProviderUnavailable`` if it answered but was not ready."""
        deadline = time.monotonic() + timeout
        status: dict[str, Any] | None = None
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                status = self.status(timeout=min(remaining, 2.0))
            except HubUnreachable:
                continue
            if status["hub"]["ready"]:
                return status
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
        raise _not_ready(self.endpoint, timeout, status)

    # --- plumbing -------------------------------------------------------------------

    def _socket(self) -> tuple[zmq.Socket, _Link]:
        """This thread's socket for one-shot calls, and what its monitor says of its connection."""
        if self._closed:
            raise RuntimeError("this HubClient is closed")
        pair = getattr(self._local, "pair", None)
        if pair is None:
            sock = self._new_socket()
            link = _Link(sock)
            with self._lock:
                self._sockets.insert(0, link.monitor)  # closed before its socket
            pair = self._local.pair = (sock, link)
        return pair

    def _new_socket(self) -> zmq.Socket:
        with self._lock:
            if self._closed:
                raise RuntimeError("this HubClient is closed")
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            _heartbeat(sock)
            if self.curve is not None:
                self.curve.apply(sock)
            sock.connect(self.endpoint)
            self._sockets.append(sock)
        return sock

    def _forget_stream(self, session: StreamSession) -> None:
        with self._lock:
            self._streams.discard(session)
            if session.sock in self._sockets:
                self._sockets.remove(session.sock)
                session.sock.close(linger=0)

    def _request(self, msg_type: MsgType, body: dict[str, Any], timeout: float | None) -> dict[str, Any]:
        """One request with one REPLY."""
        deadline = time.monotonic() + (timeout or self.timeout)
        self._ensure_hello(deadline)
        (reply,) = self._call(msg_type, body, None, deadline)
        return reply  # type: ignore[no-any-return]

    def _ensure_hello(self, deadline: float) -> _Hello:
        if self._hello is None:
            body, probe = _hello_body()
            try:
                (reply,) = self._call(MsgType.HELLO, body, None, deadline, unreachable=True)
            finally:
                probe.release()
            self._hello = _read_hello(reply)  # type: ignore[arg-type]
            self._segments = _segment_pool(self._hello, self.use_shm)
            if self._segments is not None:
                weakref.finalize(self, self._segments.close)  # a client never closed still leaves no segment
        return self._hello

    def _call(
        self, msg_type: MsgType, body: dict[str, Any], payload: bytes | None, deadline: float, unreachable: bool = False
    ) -> list[Any]:
        return list(self._exchange(msg_type, body, payload, deadline, unreachable))

    def _exchange(
        self, msg_type: MsgType, body: dict[str, Any], payload: bytes | None, deadline: float, unreachable: bool = False
    ) -> Iterator[Any]:
        """Send one request and yield its replies until the final one; cancel it on timeout, and give up at
        once if the connection to the hub closes meanwhile."""
        sock, link = self._socket()
        link.update()
        if link.down and not link.wait_up(min(RECONNECT_GRACE, max(0.0, deadline - time.monotonic()))):
            raise _refused(self.endpoint, self.curve) if link.handshake.refused else _unreachable(self.endpoint, RECONNECT_GRACE)
        request_id = str(next(self._ids))
        started = time.monotonic()
        sock.send_multipart(protocol.build(msg_type, request_id, body, payload))
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(link.monitor, zmq.POLLIN)
        while True:
            remaining = deadline - time.monotonic()
            ready = dict(poller.poll(max(1, int(remaining * 1000)))) if remaining > 0 else {}
            if link.monitor in ready and link.update():
                raise _lost(self.endpoint, self.curve, link.handshake.refused)
            if sock not in ready:
                if ready and remaining > 0:
                    continue
                if not unreachable:
                    sock.send_multipart(protocol.build(MsgType.CANCEL, request_id))
                waited = time.monotonic() - started
                raise _unreachable(self.endpoint, waited) if unreachable else _timed_out(waited)
            msg = protocol.parse(sock.recv_multipart())
            if msg.id != request_id:
                continue  # a late answer to a request we already gave up on
            value = _interpret(msg)
            yield value
            if msg.type is not MsgType.SEGMENT:
                return

    def _events(self, prepared: _Prepared, deadline: float) -> Iterator[Segment | Transcript]:
        ended: BaseException | None = None
        try:
            payload = prepared.open()
            yield from self._exchange(MsgType.TRANSCRIBE, prepared.body, payload, deadline)
        except BaseException as exc:
            ended = exc
            raise
        finally:
            prepared.release(_answered(ended))


class AsyncHubClient:
    """The same calls as coroutines, on one socket: hundreds of requests can share one event loop."""

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
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        _heartbeat(self._sock)
        if curve is not None:
            curve.apply(self._sock)
        self._monitor = self._sock.get_monitor_socket(LINK_EVENTS)
        self._down = False
        self._handshake = _Handshake()
        self._sock.connect(endpoint)
        self._ids = itertools.count(1)
        self._pending: dict[str, asyncio.Queue[Message]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._hello: _Hello | None = None
        self._segments: shm.SegmentPool | None = None
        self._hello_lock: asyncio.Lock | None = None
        self._streams: set[AsyncStreamSession] = set()

    async def __aenter__(self) -> AsyncHubClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
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
        if self._segments is not None:
            self._segments.close()
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
        result: Transcript | None = None
        events = self._transcribe(audio, provider, _options(language, beam_size, options), timeout, sample_rate, False)
        async for event in events:
            if isinstance(event, Transcript):
                result = event
        assert result is not None
        return result

    async def transcribe_stream(
        self,
        audio: AudioInput,
        provider: str | None = None,
        *,
        language: str | None = None,
        beam_size: int | None = None,
        timeout: float | None = None,
        sample_rate: int | None = None,
        **options: Any,
    ) -> AsyncIterator[Segment | Transcript]:
        """Yields each ``Segment`` as it is decoded, then the final ``Transcript``."""
        events = self._transcribe(audio, provider, _options(language, beam_size, options), timeout, sample_rate, True)
        async for event in events:
            yield event

    async def open_stream(
        self, provider: str | None = None, *, language: str | None = None, timeout: float | None = None, **options: Any
    ) -> AsyncStreamSession:
        """The coroutine twin of ``HubClient.open_stream``."""
        timeout = timeout or self.timeout
        hello = await self._ensure_hello(time.monotonic() + timeout)
        ring = shm.Ring(hello.shm_prefix, RING_SECONDS * SAMPLE_RATE) if self.use_shm and hello.shm else None
        request_id, inbox = self._inbox()
        session = AsyncStreamSession(self._sock.send_multipart, inbox, request_id, ring, timeout, self._forget_stream)
        self._streams.add(session)
        return await session._start(open_body(provider, _options(language, None, options), ring, timeout))

    def _forget_stream(self, session: AsyncStreamSession) -> None:
        self._streams.discard(session)
        self._pending.pop(session.request_id, None)

    async def status(self, timeout: float | None = None) -> dict[str, Any]:
        return await self._request(MsgType.STATUS, {}, timeout)

    async def wait_ready(self, timeout: float = 60.0) -> dict[str, Any]:
        """The coroutine twin of ``HubClient.wait_ready``."""
        deadline = time.monotonic() + timeout
        status: dict[str, Any] | None = None
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                status = await self.status(timeout=min(remaining, 2.0))
            except HubUnreachable:
                continue
            if status["hub"]["ready"]:
                return status
            await asyncio.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
        raise _not_ready(self.endpoint, timeout, status)

    async def scale(self, provider: str, size: int, timeout: float | None = None) -> dict[str, Any]:
        return await self._request(MsgType.SCALE, {"provider": provider, "size": size}, timeout)

    async def route(self, route: str, weights: dict[str, float], timeout: float | None = None) -> dict[str, Any]:
        """The coroutine twin of ``HubClient.route``."""
        return await self._request(MsgType.ROUTE, _route_body(route, weights), timeout)

    async def _request(self, msg_type: MsgType, body: dict[str, Any], timeout: float | None) -> dict[str, Any]:
        deadline = time.monotonic() + (timeout or self.timeout)
        await self._ensure_hello(deadline)
        replies = [reply async for reply in self._exchange(msg_type, body, None, deadline)]
        return replies[-1]  # type: ignore[no-any-return]

    async def _transcribe(
        self,
        audio: AudioInput,
        provider: str | None,
        options: dict[str, Any],
        timeout: float | None,
        sample_rate: int | None,
        stream: bool,
    ) -> AsyncIterator[Segment | Transcript]:
        deadline = time.monotonic() + (timeout or self.timeout)
        await self._ensure_hello(deadline)
        prepared = _prepare(self._segments, audio, provider, options, stream, deadline, sample_rate)
        ended: BaseException | None = None
        try:
            payload = prepared.open()
            async for event in self._exchange(MsgType.TRANSCRIBE, prepared.body, payload, deadline):
                yield event
        except BaseException as exc:
            ended = exc
            raise
        finally:
            prepared.release(_answered(ended))

    async def _ensure_hello(self, deadline: float) -> _Hello:
        if self._hello_lock is None:
            self._hello_lock = asyncio.Lock()
        async with self._hello_lock:
            if self._hello is None:
                body, probe = _hello_body()
                try:
                    async for reply in self._exchange(MsgType.HELLO, body, None, deadline, unreachable=True):
                        self._hello = _read_hello(reply)  # type: ignore[arg-type]
                finally:
                    probe.release()
                self._segments = _segment_pool(self._hello, self.use_shm)
                if self._segments is not None:
                    weakref.finalize(self, self._segments.close)
        assert self._hello is not None
        return self._hello

    async def _exchange(
        self, msg_type: MsgType, body: dict[str, Any], payload: bytes | None, deadline: float, unreachable: bool = False
    ) -> AsyncIterator[Any]:
        request_id, inbox = self._inbox()
        started = time.monotonic()
        grace = time.monotonic() + min(RECONNECT_GRACE, max(0.0, deadline - started))
        while self._down and time.monotonic() < grace:
            await asyncio.sleep(0.05)
        sent = answered = False
        try:
            if self._down:
                raise _refused(self.endpoint, self.curve) if self._handshake.refused else _unreachable(self.endpoint, RECONNECT_GRACE)
            await self._sock.send_multipart(protocol.build(msg_type, request_id, body, payload))
            sent = True
            while True:
                try:
                    async with asyncio.timeout(max(0.0, deadline - time.monotonic())):  # no task per wait, unlike wait_for
                        msg = await inbox.get()
                except TimeoutError:
                    waited = time.monotonic() - started
                    if unreachable:
                        raise _unreachable(self.endpoint, waited) from None
                    raise _timed_out(waited) from None
                answered = msg.type is not MsgType.SEGMENT
                yield _interpret(msg)
                if answered:
                    return
        finally:
            self._pending.pop(request_id, None)
            if sent and not answered and not unreachable:
                # timed out, cancelled, or its caller stopped listening: the hub drops the job (fire and forget,
                # since a cancelled task cannot wait)
                try:
                    self._sock.send_multipart(protocol.build(MsgType.CANCEL, request_id))
                except zmq.ZMQError:
                    pass  # the client is closing: the hub sees the connection go

    def _inbox(self) -> tuple[str, asyncio.Queue[Message]]:
        """A new request id and the queue its replies are routed to (starting the reader on first use)."""
        if self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(self._read_loop())
        request_id = str(next(self._ids))
        inbox: asyncio.Queue[Message] = asyncio.Queue()
        self._pending[request_id] = inbox
        return request_id, inbox

    async def _read_loop(self) -> None:
        """Route replies to their requests; when the connection closes, fail every request in flight."""
        poller = zmq.asyncio.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        while True:
            ready = dict(await poller.poll())
            if self._monitor in ready:
                event = parse_monitor_message(await self._monitor.recv_multipart())["event"]
                if not self._handshake.take(event):
                    self._down = event == zmq.EVENT_DISCONNECTED
                if event == zmq.EVENT_DISCONNECTED:
                    gone = _lost(self.endpoint, self.curve, self._handshake.refused).to_dict()
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
