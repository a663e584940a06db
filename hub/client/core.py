"""What both clients know: the hub's greeting, readiness waits, the socket options and ``ClientCore`` (ids,
deadlines, the HELLO and transcribe calls, the session ring). No waiting happens here: the request protocol is
``hub.client.call.Call`` (no I/O), and ``hub.client.sync`` (``HubClient``) and ``hub.client.aio``
(``AsyncHubClient``) are the two transports that wait on it.

On first use a client says HELLO. It proves that it shares the supervisor's ``/dev/shm`` by creating a small probe
segment that the supervisor must read back; only then does it pass PCM through shared memory (the supervisor forwards
a descriptor, the worker maps the segment). Otherwise, e.g. from another host, PCM travels inline. Every call has a
deadline: nothing blocks past ``timeout``, and a supervisor that is not running gives ``HubUnreachable`` rather than
a hang. The client package imports only the wire (``hub/*.py``), so a client never drags the supervisor in.
"""

from __future__ import annotations

import itertools
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq
import zmq.asyncio

from hub import shm
from hub.audio import AudioInput
from hub.client.call import (
    HELLO_TIMEOUT,
    LINK_EVENTS,
    Call,
    CurveKeys,
    Lease,
    Peer,
    ProbeLease,
    Reply,
    audio_lease,
    transcribe_body,
)
from hub.client.session import RING_SECONDS
from hub.errors import HubError, ProviderUnavailable
from hub.protocol import SAMPLE_RATE, MsgType
from hub.status import HubStatus, ReadyState

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5555"
HEARTBEAT_MS, HEARTBEAT_TIMEOUT_MS = (
    1000,
    3000,
)  # ZMTP pings: a hub silent this long (a cut link) counts as disconnected


@dataclass(frozen=True)
class Hello:
    hub_id: str
    shm: bool
    shm_prefix: str
    default_provider: str

    @staticmethod
    def from_dict(body: dict[str, Any]) -> Hello:
        return Hello(
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
            f"{name} ({p.serving} of {p.min_size} ready"
            + (f"; {p.pool.last_error}" if p.pool and p.pool.last_error else "")
            + ")"
            for name, p in status.short().items()
        )
    return ProviderUnavailable(f"the hub at {endpoint} answers but was not ready within {timeout:.0f} s: {why}")


class Readiness:
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


def _dealer(ctx: zmq.Context, curve: CurveKeys | None) -> zmq.Socket:
    """A DEALER to the hub, not yet connected: no linger (a dead hub never holds up a close), ZMTP heartbeats,
    CURVE if given."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
    if curve is not None:
        curve.apply(sock)
    return sock


def client_socket(ctx: zmq.Context, endpoint: str, curve: CurveKeys | None) -> zmq.Socket:
    """A DEALER connected to the hub."""
    sock = _dealer(ctx, curve)
    sock.connect(endpoint)
    return sock


def monitored_socket(ctx: zmq.Context, endpoint: str, curve: CurveKeys | None) -> tuple[zmq.Socket, zmq.Socket]:
    """A DEALER connected to the hub, and its monitor socket (``LINK_EVENTS``). The monitor is attached before
    the socket connects: the I/O thread may make (and fail) the first handshake before this thread runs again,
    and a refusal it reports to no monitor is lost for good when it ends the socket's only connection (a request
    then waited for the HELLO's timeout and said HUB_UNREACHABLE instead of AUTH_FAILED)."""
    sock = _dealer(ctx, curve)
    monitor = sock.get_monitor_socket(LINK_EVENTS)
    sock.connect(endpoint)
    return sock, monitor


class ClientCore:
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
        self._hello: Hello | None = None
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

    def _greeted(self, reply: Reply) -> Hello:
        assert isinstance(reply, dict)
        hello = Hello.from_dict(reply)
        self._segments = shm.SegmentPool(hello.shm_prefix) if self.use_shm and hello.shm else None
        if self._segments is not None:
            weakref.finalize(self, self._segments.close)  # a client never closed still leaves no segment
        self._hello = hello
        return hello

    def _transcribe_call(
        self,
        audio: AudioInput | shm.PcmBuffer,
        provider: str | None,
        options: dict[str, Any],
        deadline: float,
        sample_rate: int | None,
        stream: bool,
    ) -> Call:
        lease = audio_lease(audio, sample_rate, self._segments)  # bad audio fails here, before anything is sent
        return self._call(MsgType.TRANSCRIBE, transcribe_body(provider, options, stream, deadline), deadline, lease)

    def _session_ring(self, hello: Hello) -> shm.Ring | None:
        return shm.Ring(hello.shm_prefix, RING_SECONDS * SAMPLE_RATE) if self.use_shm and hello.shm else None

    def _close_segments(self) -> None:
        if self._segments is not None:
            self._segments.close()


def send_quietly(send: Callable[[list[bytes]], Any], frames: list[bytes] | None) -> None:
    """Send a CANCEL without waiting for it; a socket closed meanwhile (the client closing) is no error:
    the hub then sees the connection go."""
    if frames is not None:
        try:
            send(frames)
        except zmq.ZMQError:
            pass
