"""``AsyncHubClient``: the asyncio transport. It waits with asyncio on one socket shared by all its requests;
its ``_exchange`` is the only place it waits for a request's replies."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator
from typing import Any, cast

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from hub import protocol, shm
from hub.audio import AudioInput
from hub.client.call import (
    Call,
    LinkState,
    Reply,
)
from hub.client.call import options as _options
from hub.client.core import ClientCore, Hello, Readiness, monitored_socket, send_quietly
from hub.client.session import AsyncStreamSession, open_body
from hub.errors import HubError, HubUnreachable, JobTimeout
from hub.protocol import Message, MsgType
from hub.results import Segment, Transcript


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


class AsyncHubClient(ClientCore):
    """The same calls as coroutines, on one socket: hundreds of requests can share one event loop. A reader
    task routes every reply to its request's inbox; the first HELLO is said once, under a lock."""

    def _open_transport(self) -> None:
        self._ctx = zmq.asyncio.Context()
        sock, monitor = monitored_socket(self._ctx, self.endpoint, self.curve)
        # monitored_socket is typed for zmq.Socket; made by an asyncio Context, both are its asyncio sockets
        self._sock = cast(zmq.asyncio.Socket, sock)
        self._monitor = cast(zmq.asyncio.Socket, monitor)
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
        # destroy, not term: a socket made but not yet recorded when a Ctrl-C (KeyboardInterrupt) cut its setup short
        # would hold term() up for ever
        self._ctx.destroy(linger=0)

    async def transcribe(
        self,
        audio: AudioInput | shm.PcmBuffer,
        provider: str | None = None,
        *,
        language: str | None = None,
        beam_size: int | None = None,
        timeout: float | None = None,
        sample_rate: int | None = None,
        **options: Any,
    ) -> Transcript:
        """The coroutine twin of ``HubClient.transcribe``."""
        return await self._stream(
            audio, provider, _options(language, beam_size, options), timeout, sample_rate, False
        )._final()

    def transcribe_stream(
        self,
        audio: AudioInput | shm.PcmBuffer,
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

    async def pcm_buffer(self, capacity: int, timeout: float | None = None) -> shm.PcmBuffer:
        """Room for ``capacity`` float32 samples to fill in place and pass to ``transcribe``: in shared memory
        when the hub shares it, so the samples are not copied on their way (``shm.PcmBuffer``)."""
        await self._ensure_hello(self._deadline(timeout))
        return shm.PcmBuffer(capacity, self._segments)

    def _stream(
        self,
        audio: AudioInput | shm.PcmBuffer,
        provider: str | None,
        options: dict[str, Any],
        timeout: float | None,
        sample_rate: int | None,
        stream: bool,
    ) -> AsyncTranscriptStream:
        async def events() -> AsyncGenerator[Reply, None]:
            deadline = self._deadline(timeout)
            await self._ensure_hello(deadline)
            async for reply in self._exchange(
                self._transcribe_call(audio, provider, options, deadline, sample_rate, stream)
            ):
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
        session = AsyncStreamSession(
            self._sock.send_multipart, self._inbox(request_id), request_id, ring, timeout, self._forget_stream
        )
        self._streams.add(session)
        return await session._start(
            open_body(provider, _options(language, None, options), ring, timeout, turn_detection)
        )

    def _forget_stream(self, session: AsyncStreamSession) -> None:
        self._streams.discard(session)
        self._pending.pop(session.request_id, None)

    async def status(self, timeout: float | None = None) -> dict[str, Any]:
        """The coroutine twin of ``HubClient.status``."""
        return await self._request(MsgType.STATUS, {}, timeout)

    async def wait_ready(self, timeout: float = 60.0) -> dict[str, Any]:
        """The coroutine twin of ``HubClient.wait_ready``."""
        wait = Readiness(self.endpoint, timeout)
        while (left := wait.next_try()) is not None:
            try:
                status = await self.status(timeout=left)
            except (HubUnreachable, JobTimeout):  # no answer within this try (a slow first STATUS): try again
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

    async def _ensure_hello(self, deadline: float) -> Hello:
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
            send_quietly(self._sock.send_multipart, call.finish())

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
                event = parse_monitor_message(cast("list[bytes]", await self._monitor.recv_multipart()))  # copy=True
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
                pending = cast("asyncio.Future[list[bytes]]", self._sock.recv_multipart(zmq.NOBLOCK))
                frames = pending.result()  # a done future: DONTWAIT short-circuits
            except zmq.Again:
                return
            try:
                msg = protocol.parse(frames, protocol.MAX_ANSWER_BODY_BYTES)
            except HubError:
                continue
            inbox = self._pending.get(msg.id)
            if inbox is not None:
                inbox.put_nowait(msg)
