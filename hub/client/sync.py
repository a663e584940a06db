"""``HubClient``: the blocking, thread-safe transport. It waits with a ZeroMQ poller on a socket per thread; its
``_exchange`` is the only place it waits for a request's replies."""

from __future__ import annotations

import threading
import time
from collections.abc import Generator, Iterator
from functools import partial
from typing import Any

import zmq
import zmq.asyncio
from zmq.utils.monitor import recv_monitor_message

from hub import protocol
from hub.audio import AudioInput
from hub.client.call import (
    Call,
    LinkState,
    Reply,
)
from hub.client.call import options as _options
from hub.client.core import ClientCore, Hello, Readiness, client_socket, monitored_socket, send_quietly
from hub.client.session import StreamSession, open_body
from hub.errors import HubUnreachable, JobTimeout
from hub.protocol import MsgType
from hub.results import Segment, Transcript


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


class _Link:
    """A sync socket's monitor and the ``LinkState`` it feeds, read between polls."""

    def __init__(self, monitor: zmq.Socket) -> None:
        self.monitor = monitor
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


class HubClient(ClientCore):
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
        # destroy, not term: a socket made but not yet recorded when a Ctrl-C (KeyboardInterrupt) cut its setup short
        # would hold term() up for ever
        self._ctx.destroy(linger=0)

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
        return self._stream(
            audio, provider, _options(language, beam_size, options), timeout, sample_rate, False
        )._final()

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
        self,
        audio: AudioInput,
        provider: str | None,
        options: dict[str, Any],
        timeout: float | None,
        sample_rate: int | None,
        stream: bool,
    ) -> TranscriptStream:
        deadline = self._deadline(timeout)
        self._ensure_hello(deadline)
        return TranscriptStream(
            self._exchange(self._transcribe_call(audio, provider, options, deadline, sample_rate, stream))
        )

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
        wait = Readiness(self.endpoint, timeout)
        while (left := wait.next_try()) is not None:
            try:
                status = self.status(timeout=left)
            except (HubUnreachable, JobTimeout):  # no answer within this try (a slow first STATUS): try again
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

    def _ensure_hello(self, deadline: float) -> Hello:
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
                    if (
                        reply := call.receive(protocol.parse(sock.recv_multipart(), protocol.MAX_ANSWER_BODY_BYTES))
                    ) is not None:
                        yield reply
                elif call.left() <= 0:
                    raise call.expire()
        finally:
            send_quietly(partial(sock.send_multipart, flags=zmq.NOBLOCK), call.finish())

    def _socket(self) -> tuple[zmq.Socket, _Link]:
        """This thread's socket for one-shot calls, and what its monitor says of its connection."""
        self._check_open()
        pair = getattr(self._local, "pair", None)
        if pair is None:
            with self._lock:
                self._check_open()
                sock, monitor = monitored_socket(self._ctx, self.endpoint, self.curve)
                self._sockets.append(sock)
                self._sockets.insert(0, monitor)  # closed before its socket
            link = _Link(monitor)
            pair = self._local.pair = (sock, link)
        return pair

    def _new_socket(self) -> zmq.Socket:
        with self._lock:
            self._check_open()
            sock = client_socket(self._ctx, self.endpoint, self.curve)
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
