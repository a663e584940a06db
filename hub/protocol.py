"""The wire format: the only module that knows how frames are laid out.

Every message, client to supervisor and supervisor to worker alike, is one ZeroMQ
multipart message of four or five frames::

    [version (1 byte)] [type (ASCII)] [id (ASCII, <= 64 bytes)] [body (JSON object)] [payload?]

A ROUTER socket puts the peer's identity in front; ``split_identity`` takes it off.
``id`` is the client's request id on the frontend and the supervisor's job id on the
backend. ``payload`` carries raw bytes (inline float32 PCM) and is the only frame
that may be large. ``build`` and ``parse`` are the single place where frames are made
and checked: anything malformed raises ``BadRequest`` and never reaches the core.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

from hub.errors import BadRequest, InvalidAudio

VERSION = 1
_VERSION_FRAME = bytes([VERSION])
MAX_ID_BYTES = 64
MAX_BODY_BYTES = 256 * 1024  # a client's request, as the supervisor reads it
# a message from the hub's own side (a worker's answer to the supervisor, the hub's to a client): the transcript
# of a long session or recording, words and all, runs to megabytes, and must arrive whole
MAX_ANSWER_BODY_BYTES = 64 * 2**20
SAMPLE_RATE = 16000
MAX_RING_SAMPLES = 600 * SAMPLE_RATE  # the largest ring a live session may offer: ten minutes of audio
_ID_RE = re.compile(rb"^[\x21-\x7e]{1,64}$")


class MsgType(str, Enum):
    """Message types; the value is what travels in the type frame."""

    # client -> supervisor
    HELLO = "HELLO"
    STATUS = "STATUS"
    TRANSCRIBE = "TRANSCRIBE"
    CANCEL = "CANCEL"  # also supervisor -> worker: drop a held job that has not started
    SCALE = "SCALE"
    ROUTE = "ROUTE"  # set a route's weights at run time
    STREAM_OPEN = "STREAM_OPEN"  # also supervisor -> worker, with the job id
    STREAM_DATA = "STREAM_DATA"  # likewise
    STREAM_CLOSE = "STREAM_CLOSE"  # likewise
    # supervisor -> client (SEGMENT, RESULT and ERROR also travel worker -> supervisor)
    REPLY = "REPLY"
    PARTIAL = "PARTIAL"  # a live session's text that may still change (worker -> supervisor too)
    EVENT = "EVENT"  # a live session's speech boundary or utterance end, with VAD on (worker -> supervisor too)
    HEARD = "HEARD"  # how far a live session's worker has read, when it has no text to send (likewise)
    SEGMENT = "SEGMENT"
    RESULT = "RESULT"
    ERROR = "ERROR"
    # supervisor -> worker
    JOB = "JOB"
    STOP = "STOP"
    # worker -> supervisor
    READY = "READY"
    LOAD_FAILED = "LOAD_FAILED"
    HEARTBEAT = "HEARTBEAT"
    BATCH = "BATCH"  # the held jobs (or live sessions) it starts decoding together now (body: jobs)


_TYPES = {t.value.encode(): t for t in MsgType}


class ExitCode:
    """Worker exit statuses, so the supervisor tells a bad model from a crash (as gunicorn does)."""

    OK = 0
    BOOT_ERROR = 3  # bad arguments or the backend could not be reached
    MODEL_LOAD_ERROR = 4  # the model could not be loaded: back off before respawning


@dataclass(frozen=True)
class Message:
    """A parsed message; ``body`` is a JSON object, ``payload`` raw bytes or None."""

    type: MsgType
    id: str
    body: dict[str, Any]
    payload: bytes | None = None


def build(
    msg_type: MsgType, msg_id: str, body: dict[str, Any] | None = None, payload: bytes | None = None
) -> list[bytes]:
    """Frames for one message (without any routing identity)."""
    frames = [
        _VERSION_FRAME,
        msg_type.value.encode(),
        msg_id.encode("ascii"),
        json.dumps(body or {}, separators=(",", ":"), allow_nan=False).encode(),
    ]
    if payload is not None:
        frames.append(payload)
    return frames


def parse(frames: list[bytes], max_body: int = MAX_BODY_BYTES) -> Message:
    """Check and decode a message; raise ``BadRequest`` saying what is wrong. ``max_body`` is
    ``MAX_ANSWER_BODY_BYTES`` where the message comes from the hub's side."""
    if len(frames) not in (4, 5):
        raise BadRequest(f"expected 4 or 5 frames, got {len(frames)}")
    version, raw_type, raw_id, raw_body = frames[:4]
    if version != _VERSION_FRAME:
        got = version[0] if len(version) == 1 else f"{len(version)} bytes"
        raise BadRequest(f"unsupported protocol version {got}; this hub speaks version {VERSION}")
    msg_type = _TYPES.get(bytes(raw_type))
    if msg_type is None:
        raise BadRequest(f"unknown message type {bytes(raw_type)[:32]!r}")
    if not _ID_RE.match(bytes(raw_id)):
        raise BadRequest(f"message id must be 1-{MAX_ID_BYTES} printable ASCII characters")
    if len(raw_body) > max_body:
        raise BadRequest(f"message body of {len(raw_body)} bytes exceeds {max_body}")
    try:
        body = json.loads(raw_body, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"message body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest("message body must be a JSON object")
    payload = bytes(frames[4]) if len(frames) == 5 else None
    return Message(msg_type, bytes(raw_id).decode("ascii"), body, payload)


def peek_id(frames: list[bytes]) -> str:
    """The id of a message that may be malformed, so an error reply can still name it; "-" if it has none."""
    if len(frames) >= 3 and _ID_RE.match(bytes(frames[2])):
        return bytes(frames[2]).decode("ascii")
    return "-"


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed")


def split_identity(frames: list[bytes]) -> tuple[bytes, list[bytes]]:
    """Take the identity a ROUTER socket prepends; reject an envelope without one."""
    if len(frames) < 2:
        raise BadRequest("message has no routing identity")
    return frames[0], frames[1:]


# --- audio descriptors -------------------------------------------------------------


@dataclass(frozen=True)
class AudioRef:
    """Where a job's PCM lives: a shared-memory segment by name, or the inline payload.

    ``samples`` counts float32 mono samples at 16 kHz; ``offset`` is the first of them in the segment
    (a piece of a split request reads its part of the request's one segment).
    """

    samples: int
    shm: str | None = None
    offset: int = 0

    @property
    def seconds(self) -> float:
        return self.samples / SAMPLE_RATE

    def to_dict(self) -> dict[str, Any]:
        return {"samples": self.samples, "shm": self.shm, **({"offset": self.offset} if self.offset else {})}


def parse_audio_ref(body: dict[str, Any], payload: bytes | None, max_samples: int) -> AudioRef:
    """Validate the ``audio`` field of a job against its payload; errors are ``InvalidAudio``."""
    audio = body.get("audio")
    if not isinstance(audio, dict):
        raise BadRequest("field 'audio' must be an object with 'samples' and optionally 'shm'")
    samples = audio.get("samples")
    if not isinstance(samples, int) or isinstance(samples, bool):
        raise BadRequest("field 'audio.samples' must be an integer")
    if samples <= 0:
        raise InvalidAudio("the audio is empty (0 samples)")
    if samples > max_samples:
        raise InvalidAudio(
            f"the audio is {samples / SAMPLE_RATE:.0f} s long, over the limit of {max_samples / SAMPLE_RATE:.0f} s"
        )
    shm, offset = audio.get("shm"), audio.get("offset", 0)
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
        raise BadRequest("field 'audio.offset' must be a sample position (an integer >= 0)")
    if shm is None:
        if offset:
            raise BadRequest("field 'audio.offset' names a place in a shared-memory segment; inline PCM has none")
        if payload is None:
            raise InvalidAudio("no shared-memory segment named and no inline PCM frame sent")
        if len(payload) != samples * 4:
            raise InvalidAudio(f"inline PCM is {len(payload)} bytes; {samples} float32 samples need {samples * 4}")
        return AudioRef(samples=samples)
    if not isinstance(shm, str) or not shm:
        raise BadRequest("field 'audio.shm' must be a segment name")
    if payload is not None:
        raise BadRequest("send either a shared-memory segment or an inline PCM frame, not both")
    return AudioRef(samples=samples, shm=shm, offset=offset)


@dataclass(frozen=True)
class RingRef:
    """A live session's shared-memory ring: its segment and its capacity in float32 samples."""

    shm: str
    capacity: int

    def to_dict(self) -> dict[str, Any]:
        return {"shm": self.shm, "capacity": self.capacity}


def parse_ring(body: dict[str, Any], max_samples: int = MAX_RING_SAMPLES) -> RingRef | None:
    """The ``ring`` of a STREAM_OPEN, or None for a client that sends its chunks inline."""
    ring = body.get("ring")
    if ring is None:
        return None
    if not isinstance(ring, dict) or not isinstance(ring.get("shm"), str):
        raise BadRequest("field 'ring' must be an object with 'shm' (a segment name) and 'capacity'")
    capacity = ring.get("capacity")
    if not isinstance(capacity, int) or isinstance(capacity, bool) or not 0 < capacity <= max_samples:
        raise BadRequest(f"field 'ring.capacity' must be an integer number of samples in 1..{max_samples}")
    return RingRef(shm=ring["shm"], capacity=capacity)


def parse_stream_data(body: dict[str, Any], payload: bytes | None) -> int:
    """A STREAM_DATA's position: ``end`` (samples written to the ring so far) or the inline chunk's size."""
    if payload is not None:
        if len(payload) % 4:
            raise InvalidAudio(f"an inline chunk must be float32 samples, got {len(payload)} bytes")
        return len(payload) // 4
    end = body.get("end")
    if not isinstance(end, int) or isinstance(end, bool) or end < 0:
        raise BadRequest("field 'end' must be the count of samples written to the ring so far")
    return end


@dataclass(frozen=True)
class Resume:
    """A STREAM_OPEN's ``resume``: the session moves here from a worker that died. The new worker starts
    reading the stream at sample ``start`` and knows the final segments ``finals`` (their words are not
    produced again; the text before ``start`` is its prompt)."""

    start: int
    finals: tuple[dict[str, Any], ...]

    def to_dict(self) -> dict[str, Any]:
        return {"start": self.start, "finals": list(self.finals)}


def parse_resume(body: dict[str, Any]) -> Resume | None:
    """The ``resume`` of a STREAM_OPEN, or None for a new session."""
    resume = body.get("resume")
    if resume is None:
        return None
    start = resume.get("start") if isinstance(resume, dict) else None
    finals = resume.get("finals") if isinstance(resume, dict) else None
    if not isinstance(start, int) or isinstance(start, bool) or start < 0:
        raise BadRequest("field 'resume.start' must be a sample position (an integer >= 0)")
    if not isinstance(finals, list) or not all(isinstance(f, dict) for f in finals):
        raise BadRequest("field 'resume.finals' must be a list of segments")
    return Resume(start=start, finals=tuple(finals))


TURN_DETECTION = {  # a STREAM_OPEN's ``turn_detection``: the session's own stream.vad settings, each optional
    "vad": (lambda v: isinstance(v, bool), "true or false"),
    "endpoint_ms": (
        lambda v: isinstance(v, int) and not isinstance(v, bool) and 100 <= v <= 10_000,
        "an integer from 100 to 10000",
    ),
    "vad_threshold": (
        lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0.2 <= v < 1,
        "a number from 0.2 to below 1",
    ),
}


def parse_turn_detection(body: dict[str, Any]) -> dict[str, Any] | None:
    """The ``turn_detection`` of a STREAM_OPEN: the provider's ``stream.vad``, ``stream.endpoint_ms`` and
    ``stream.vad_threshold`` this session overrides (empty: the provider's own). None when the field is
    absent: a client from before VAD, which cannot read EVENT and HEARD, so its sessions get no VAD."""
    turns = body.get("turn_detection")
    if turns is None:
        return None
    if not isinstance(turns, dict):
        raise BadRequest("field 'turn_detection' must be an object with vad, endpoint_ms and/or vad_threshold")
    problems = turn_detection_problems(turns)
    if problems:
        raise BadRequest("turn_detection: " + "; ".join(problems))
    return dict(turns)


def turn_detection_problems(settings: dict[str, Any]) -> list[str]:
    """What is wrong with these VAD settings (empty when nothing is), a line each."""
    problems = []
    for key, value in settings.items():
        check = TURN_DETECTION.get(key)
        if check is None:
            problems.append(f"{key} is not a VAD setting (known: {', '.join(TURN_DETECTION)})")
        elif not check[0](value):
            problems.append(f"{key} must be {check[1]}, got {value!r}")
    return problems


def parse_options(body: dict[str, Any]) -> dict[str, Any]:
    """The ``options`` object of a job: string keys, JSON values, finite numbers."""
    options = body.get("options", {})
    if not isinstance(options, dict):
        raise BadRequest("field 'options' must be an object")
    for key, value in options.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise BadRequest(f"option {key!r} must be a finite number")
    return options


def parse_route_key(body: dict[str, Any]) -> str | None:
    """The ``route_key`` of a request: which version a sticky route keeps it on (a user or device id)."""
    key = body.get("route_key")
    if key is None:
        return None
    if not isinstance(key, str) or not 0 < len(key) <= 256:
        raise BadRequest("field 'route_key' must be a string of 1-256 characters (a user or device id)")
    return key


def parse_weights(body: dict[str, Any]) -> tuple[str, dict[str, float]]:
    """A ROUTE request: the route's name and its new weights, provider -> a number >= 0."""
    route, weights = body.get("route"), body.get("weights")
    if not isinstance(route, str) or not route:
        raise BadRequest("field 'route' must be a route name")
    if not isinstance(weights, dict) or not weights:
        raise BadRequest("field 'weights' must be an object of provider -> weight, e.g. {\"whisper-v1\": 100}")
    for provider, weight in weights.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
            raise BadRequest(f"the weight of {provider!r} must be a number >= 0, got {weight!r}")
    return route, {str(p): float(w) for p, w in weights.items()}


def parse_split(body: dict[str, Any]) -> bool:
    """A TRANSCRIBE's ``split``: False keeps a long request whole (one worker decodes it all)."""
    split = body.get("split", True)
    if not isinstance(split, bool):
        raise BadRequest("field 'split' must be true or false")
    return split


def parse_timeout(body: dict[str, Any]) -> float | None:
    timeout = body.get("timeout")
    if timeout is None:
        return None
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not timeout > 0:
        raise BadRequest("field 'timeout' must be a positive number of seconds")
    return float(timeout)


# --- the supervisor -> worker contract --------------------------------------------


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker process needs, passed on its command line as JSON.

    The supervisor builds it from the config; the worker never reads the config file.
    """

    id: str
    provider: str
    type: str
    model: str
    device: str
    compute_type: str
    cpu_threads: int
    backend: str
    shm_prefix: str
    heartbeat_interval: float
    options: dict[str, Any]
    allow_download: bool = False
    log_format: str = "text"
    stream: dict[str, Any] = field(default_factory=dict)
    max_batch: int = 1  # jobs it may hold and decode together (pool.max_batch)
    batch_wait_ms: float = 5.0  # how long a partial batch waits for more jobs

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @staticmethod
    def from_json(text: str) -> WorkerSpec:
        return WorkerSpec(**json.loads(text))
