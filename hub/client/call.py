"""One request's protocol, client side, without I/O: what to send, what a reply means, when it is over.

h11 and httpx's cores are the model: a ``Call`` never touches a socket or a clock it was not given. A
transport (``HubClient`` waits with a ZeroMQ poller, ``AsyncHubClient`` with asyncio) does only this::

    frames = call.request()            # send them
    while not call.over:                # wait at most call.left() for the next message
        value = call.receive(message)   # a Segment, the Transcript, a REPLY body; the hub's ERROR raises
        ...                             # on the deadline: raise call.expire(); on a closed link: call.lost(...)
    cancel = call.finish()              # in a finally: send it if not None

So the two clients cannot disagree about request ids, deadlines, cancelling, which replies end a request,
or when a shared-memory segment may be used again. ``LinkState`` is the same for a socket's connection:
the monitor events go in, "is it down, did the hub refuse our key" comes out.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

import numpy as np
import zmq
import zmq.auth

from hub import protocol, shm
from hub.audio import AudioInput, to_pcm
from hub.errors import AuthFailed, BadRequest, HubError, HubUnreachable, InvalidAudio, JobTimeout
from hub.protocol import Message, MsgType
from hub.results import Segment, Transcript

RECONNECT_GRACE = 1.0  # seconds a request waits for a closed connection to come back before giving up
# Seconds a HELLO waits for an answer, whatever the call's timeout: a supervisor answers it itself at once, so
# silence this long means no hub is there (a gateway's 600 s request timeout would otherwise hold a caller that long)
HELLO_TIMEOUT = 10.0
AUTH_EVENTS = (
    zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
)
LINK_EVENTS = zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED | AUTH_EVENTS | zmq.EVENT_HANDSHAKE_SUCCEEDED

Reply = Segment | Transcript | dict[str, Any]


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


@dataclass(frozen=True)
class Peer:
    """The hub a client talks to, and the errors that name it."""

    endpoint: str
    curve: CurveKeys | None = None

    def unreachable(self, waited: float) -> HubUnreachable:
        return HubUnreachable(
            f"no ASR Hub answered at {self.endpoint} within {waited:.1f} s; "
            "is `python -m hub.supervisor` running there, and is the endpoint right?"
        )

    def refused(self) -> AuthFailed:
        if self.curve is None:
            return AuthFailed(
                f"the hub at {self.endpoint} refused this client in the handshake: it requires CURVE keys "
                "(hub.curve) and this client has none; pass curve=CurveKeys.load(...) (or --client-key and --server-key)"
            )
        return AuthFailed(
            f"the hub at {self.endpoint} refused this client in the CURVE handshake (server key "
            f"{self.curve.server.decode()}, client public key {self.curve.public.decode()}): the client's public key "
            "is not in the hub's hub.curve.allowed_clients folder, or the server key is not that hub's, or that hub "
            "does not use CURVE (no hub.curve: connect without keys)"
        )

    def lost(self, link: LinkState) -> HubError:
        """Why the connection closed: the hub refused our key, or it stopped."""
        if link.handshake.refused:
            return self.refused()
        return HubUnreachable(
            f"the connection to the hub at {self.endpoint} closed while the request was in flight: the supervisor "
            "stopped or restarted; retry once it is back"
        )

    def down(self, link: LinkState) -> HubError:
        """Why a request was not sent: the connection stayed closed through the reconnect grace."""
        return self.refused() if link.handshake.refused else self.unreachable(RECONNECT_GRACE)


class _Handshake:
    """Whether the hub refused this client's key, from the socket's handshake events.

    A handshake that fails with no detail is how a wrong server key shows, but also how a hub that stops in
    mid-handshake (a drain, a crash) shows. It counts as a refusal only until a handshake has succeeded: a hub
    that accepted this client's key once and then fails one is, in practice, going away, and the request lost
    with it is HUB_UNREACHABLE (a pool retries it on another hub), not AUTH_FAILED (final).

    A protocol failure is a refusal only when the security mechanisms differ (CURVE on one side, none on the
    other): any other one (a peer that does not speak ZMTP, say an HTTP port) says nothing about our key.
    """

    __slots__ = ("accepted", "refused")

    def __init__(self) -> None:
        self.accepted = False
        self.refused = False

    def take(self, event: int, value: int = 0) -> bool:
        """Account for ``event`` (with its monitor ``value``) if it is a handshake's outcome; False for any other."""
        if not event & (AUTH_EVENTS | zmq.EVENT_HANDSHAKE_SUCCEEDED):
            return False
        if event & zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self.accepted, self.refused = True, False
        elif event & zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
            self.refused = value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH
        else:
            self.refused = bool(event & zmq.EVENT_HANDSHAKE_FAILED_AUTH) or not self.accepted
        return True


class LinkState:
    """A socket's connection as its monitor events tell it: down after a close until it reconnects."""

    __slots__ = ("down", "handshake")

    def __init__(self) -> None:
        self.down = False
        self.handshake = _Handshake()

    def take(self, event: int, value: int = 0) -> bool:
        """Account for one monitor event (and its value); True if it closed the connection."""
        if not self.handshake.take(event, value):
            self.down = event == zmq.EVENT_DISCONNECTED
        return event == zmq.EVENT_DISCONNECTED


class Lease(Protocol):
    """What a request holds while it is in flight (a PCM segment, a HELLO's probe)."""

    def open(self, body: dict[str, Any]) -> bytes | None:
        """Describe the resource in ``body``; return an inline payload, or None."""

    def release(self, answered: bool) -> None:
        """``answered``: the hub's final reply came, so nothing on the hub side reads the resource any more."""


@dataclass
class AudioLease:
    """A TRANSCRIBE's audio: converted at the call (so bad input fails there), put in a segment leased from
    the client's pool only when the request is sent, and given back (for reuse only if answered) at the end."""

    pcm: np.ndarray | None  # None: the samples are already in ``segment`` (a filled ``shm.PcmBuffer``)
    segments: shm.SegmentPool | None  # None: the PCM travels inline
    segment: shm.PcmSegment | None = None
    samples: int = 0

    def open(self, body: dict[str, Any]) -> bytes | None:
        if self.pcm is not None:
            self.samples = int(self.pcm.size)
        if self.segments is None:
            assert self.pcm is not None
            body["audio"] = {"samples": self.samples}
            return self.pcm.tobytes()
        if self.segment is None:
            assert self.pcm is not None
            self.segment = self.segments.lease(self.pcm)
        body["audio"] = {"samples": self.samples, "shm": self.segment.name}
        return None

    def release(self, answered: bool) -> None:
        if self.segment is not None and self.segments is not None:
            self.segments.give_back(self.segment, answered)


@dataclass
class ProbeLease:
    """A HELLO's shared-memory probe: the hub proves it shares ``/dev/shm`` by reading its nonce back."""

    probe: shm.PcmSegment | None = None

    def open(self, body: dict[str, Any]) -> bytes | None:
        self.probe, nonce = shm.create_probe()
        body.update(probe=self.probe.name, nonce=nonce)
        return None

    def release(self, answered: bool) -> None:
        if self.probe is not None:
            self.probe.release()


class CallState(str, Enum):
    READY = "ready"  # built, not sent
    SENT = "sent"  # sent, its final reply not in yet
    ANSWERED = "answered"  # the hub's final reply came: a RESULT, a REPLY or the hub's own ERROR
    EXPIRED = "expired"  # the deadline passed first
    LOST = "lost"  # the connection closed first, or never came up


@dataclass(eq=False)
class Call:
    """One request from its frames to its final reply. See the module docstring for how a transport drives it.

    A HELLO is special in two ways: its expiry means no hub answered (``HubUnreachable``, not ``JobTimeout``),
    and it is never cancelled (the hub keeps nothing for it).
    """

    kind: MsgType
    id: str
    body: dict[str, Any]
    deadline: float
    peer: Peer
    lease: Lease | None = None
    state: CallState = CallState.READY
    started: float = field(default_factory=time.monotonic)

    def left(self) -> float:
        """Seconds until the deadline (0 once it has passed)."""
        return max(0.0, self.deadline - time.monotonic())

    def grace(self) -> float:
        """How long to wait for a closed connection to come back before sending."""
        return min(RECONNECT_GRACE, self.left())

    @property
    def over(self) -> bool:
        return self.state not in (CallState.READY, CallState.SENT)

    def request(self) -> list[bytes]:
        """The request's frames; from now on the call waits for replies."""
        payload = self.lease.open(self.body) if self.lease is not None else None
        self.state = CallState.SENT
        return protocol.build(self.kind, self.id, self.body, payload)

    def receive(self, msg: Message) -> Reply | None:
        """What a message means for this call: None if it is not for it (a late answer to a request given up
        on); a ``Segment`` (more to come), the ``Transcript`` or a REPLY's body (the end). An ERROR raises: the
        hub's own ends the call as answered; HUB_UNREACHABLE and AUTH_FAILED, which only a client makes (its
        reader's word that the connection closed), end it as lost."""
        if msg.id != self.id or self.state is not CallState.SENT:
            return None
        if msg.type is MsgType.SEGMENT:
            return Segment.from_dict(msg.body)
        self.state = CallState.ANSWERED
        if msg.type is MsgType.ERROR:
            error = HubError.from_dict(msg.body)
            if isinstance(error, (HubUnreachable, AuthFailed)):
                self.state = CallState.LOST
            raise error
        if msg.type is MsgType.RESULT:
            return Transcript.from_dict(msg.body)
        return msg.body

    def expire(self) -> HubError:
        """The error for a deadline that passed with the call still open."""
        self.state = CallState.EXPIRED
        waited = time.monotonic() - self.started
        if self.kind is MsgType.HELLO:
            return self.peer.unreachable(waited)
        return JobTimeout(
            f"no answer within {waited:.1f} s (the client's timeout); the request was cancelled", request_id=self.id
        )

    def lost(self, link: LinkState, sent: bool = True) -> HubError:
        """The error for a connection that closed (``sent``) or stayed down before sending (not ``sent``)."""
        self.state = CallState.LOST
        return self.peer.lost(link) if sent else self.peer.down(link)

    def unsendable(self, link: LinkState) -> HubError | None:
        """Why a request still waiting for room to be sent must stop (the hub refused our key, or the deadline
        passed); None while it may wait on."""
        if link.handshake.refused:
            return self.lost(link, sent=False)
        if self.left() <= 0:
            return self.expire()
        return None

    def finish(self) -> list[bytes] | None:
        """Let go of what the call holds; return a CANCEL to send when the hub may still be working on it
        (it expired, or its caller stopped listening), else None."""
        if self.lease is not None:
            self.lease.release(self.state is CallState.ANSWERED)
            self.lease = None
        if self.kind is MsgType.HELLO or self.state not in (CallState.SENT, CallState.EXPIRED):
            return None
        self.state = CallState.EXPIRED
        return protocol.build(MsgType.CANCEL, self.id)


def options(language: str | None, beam_size: int | None, extra: dict[str, Any]) -> dict[str, Any]:
    """A call's request options: its keywords merged over ``**options``, None values left out."""
    named = {"language": language, "beam_size": beam_size}
    return {**extra, **{k: v for k, v in named.items() if v is not None}}


def route_fields(options: dict[str, Any]) -> dict[str, Any]:
    """Take ``route_key`` (a user or device id: a sticky route keeps it on one version) out of a call's
    keyword options, where the SDK's calls accept it, into the request's own fields."""
    key = options.pop("route_key", None)
    return {} if key is None else {"route_key": key}


def split_field(options: dict[str, Any]) -> dict[str, Any]:
    """Take ``split`` (False: never cut this request into pieces, however long) out of a call's keyword
    options into the request's own fields."""
    split = options.pop("split", None)
    if split is None:
        return {}
    if not isinstance(split, bool):
        raise BadRequest(f"split must be True or False, got {split!r}")
    return {"split": split}


def transcribe_body(provider: str | None, options: dict[str, Any], stream: bool, deadline: float) -> dict[str, Any]:
    timeout = max(0.001, deadline - time.monotonic())  # the supervisor gives up when the client would
    fields = {**route_fields(options), **split_field(options)}
    return {"provider": provider, "options": options, "stream": stream, "timeout": timeout, **fields}


def audio_lease(
    audio: AudioInput | shm.PcmBuffer, sample_rate: int | None, segments: shm.SegmentPool | None
) -> AudioLease:
    if isinstance(audio, shm.PcmBuffer):
        if audio.size == 0:
            raise InvalidAudio("the audio is empty (0 samples)")
        if (segment := audio.take(segments)) is not None:
            return AudioLease(None, segments, segment, audio.size)  # sent as it is: no copy
        audio = audio.samples()
    return AudioLease(to_pcm(audio, sample_rate), segments)
