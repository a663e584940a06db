"""OpenAI's Realtime API for transcription sessions, without I/O: client events in, server events out.

``parse_client_event`` turns one text message into a typed event (or raises ``Problem``, which becomes an
``error`` event); ``session_event`` and ``error_event`` build what the server says; ``Turns`` maps a hub
live session's events (finals, and with the hub's VAD the speech boundaries and utterance ends) onto the
API's items: ``input_audio_buffer.speech_started`` / ``.speech_stopped`` / ``.committed``, then
``conversation.item.input_audio_transcription.delta`` and ``.completed``. Both dialects are read: the
GA ``session.update`` (``session.type: "transcription"``, ``audio.input.*``) and the beta
``transcription_session.update`` (``input_audio_format``, ``input_audio_transcription``, ``turn_detection``).
Server events carry no ``event_id`` here: the connection stamps one on each as it sends it.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from enum import Enum
from typing import Any

from hub.client import StreamEvent
from hub.errors import HubError
from hub.gateway.errors import ApiError, mapping
from hub.results import join_text

RATE = 24000  # the only input rate of the Realtime API: pcm16, mono, little-endian
MIN_COMMIT_MS = 100  # a commit of less audio than this is refused, as OpenAI does
DEFAULT_MODEL = "whisper-1"  # the gateway's alias for the hub's default provider
HUB_ENDPOINT_MS = (100, 10_000)  # the silence that ends an utterance, as a hub session's turn_detection takes it
HUB_THRESHOLD = (0.2, 0.99)  # the VAD's speech threshold, likewise
AT_TOLERANCE_S = 0.01  # the hub's times of one boundary agree to well within this


class Dialect(str, Enum):
    """Which shape of the API the client speaks: GA (``session.*``) or beta (``transcription_session.*``)."""

    GA = "ga"
    BETA = "beta"


class ErrorCode(str, Enum):
    """The ``error.code`` of the problems this module finds in what a client sends."""

    INVALID_JSON = "invalid_json"
    INVALID_EVENT = "invalid_event"
    UNKNOWN_EVENT = "unknown_event_type"
    INVALID_BASE64 = "invalid_base64"
    INVALID_VALUE = "invalid_value"
    UNSUPPORTED = "unsupported_value"
    COMMIT_EMPTY = "input_audio_buffer_commit_empty"


class Problem(Exception):
    """What becomes one ``error`` event: OpenAI's ``{type, code, message, param, event_id}``."""

    def __init__(
        self,
        code: str,
        message: str,
        param: str | None = None,
        event_id: str | None = None,
        kind: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        code = code.value if isinstance(code, Enum) else code
        self.code, self.message, self.param, self.event_id, self.kind = code, message, param, event_id, kind

    @classmethod
    def of(cls, exc: HubError | ApiError, event_id: str | None = None) -> Problem:
        """A hub or gateway error in the API's terms: the type from the gateway's errors table, the code lower-cased."""
        return cls(exc.code.lower(), exc.message, getattr(exc, "param", None), event_id, mapping(exc.code).type)

    def body(self) -> dict[str, Any]:
        return {
            "type": self.kind,
            "code": self.code,
            "message": self.message,
            "param": self.param,
            "event_id": self.event_id,
        }


@dataclass(frozen=True)
class ServerVad:
    """``turn_detection: {type: "server_vad", ...}``: the hub's VAD ends each turn, with this session's
    ``threshold`` and ``silence_duration_ms`` (``hub_turns``); ``prefix_padding_ms`` is kept and echoed only."""

    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 500

    def hub_turns(self) -> dict[str, Any]:
        """The hub session's ``turn_detection``: VAD on, its endpoint and threshold brought into the ranges
        the hub takes (an endpoint of 100 ms to 10 s, a threshold of 0.2 to 0.99)."""
        return {
            "vad": True,
            "endpoint_ms": min(max(self.silence_duration_ms, HUB_ENDPOINT_MS[0]), HUB_ENDPOINT_MS[1]),
            "vad_threshold": min(max(self.threshold, HUB_THRESHOLD[0]), HUB_THRESHOLD[1]),
        }


@dataclass(frozen=True)
class SessionConfig:
    """A transcription session's effective configuration. ``turn_detection`` None: the client commits."""

    model: str = DEFAULT_MODEL
    language: str | None = None
    prompt: str = ""
    turn_detection: ServerVad | None = ServerVad()

    @property
    def hub_fields(self) -> tuple[str, str | None, str, ServerVad | None]:
        """What a hub session is opened with: a change to these needs a new one."""
        return self.model, self.language, self.prompt, self.turn_detection


@dataclass(frozen=True)
class UpdateSession:
    config: SessionConfig
    dialect: Dialect
    event_id: str | None = None


@dataclass(frozen=True)
class AppendAudio:
    pcm: bytes  # pcm16 little-endian at RATE, whole samples
    event_id: str | None = None


@dataclass(frozen=True)
class CommitBuffer:
    event_id: str | None = None


@dataclass(frozen=True)
class ClearBuffer:
    event_id: str | None = None


ClientEvent = UpdateSession | AppendAudio | CommitBuffer | ClearBuffer

_CONVERSATION_EVENTS = frozenset(
    {
        "response.create",
        "response.cancel",
        "conversation.item.create",
        "conversation.item.retrieve",
        "conversation.item.truncate",
        "conversation.item.delete",
        "output_audio_buffer.clear",
    }
)


# --- client events ------------------------------------------------------------------------


def parse_client_event(text: str, config: SessionConfig) -> ClientEvent:
    """One client message as a typed event; a session update is merged into ``config`` (only the fields it
    names change). Raises ``Problem`` naming what is wrong, with the event's ``event_id`` where it had one."""
    try:
        body = json.loads(text)
    except ValueError as exc:
        raise Problem(
            ErrorCode.INVALID_JSON, f"the message is not valid JSON ({exc}): send one JSON event a message"
        ) from None
    if not isinstance(body, dict):
        raise Problem(ErrorCode.INVALID_EVENT, f"an event must be a JSON object, got {type(body).__name__}")
    event_id = body.get("event_id") if isinstance(body.get("event_id"), str) else None
    kind = body.get("type")
    if not isinstance(kind, str):
        raise Problem(ErrorCode.INVALID_EVENT, "the event has no 'type' string", "type", event_id)
    try:
        if kind == "input_audio_buffer.append":
            return AppendAudio(_audio(body.get("audio")), event_id)
        if kind == "input_audio_buffer.commit":
            return CommitBuffer(event_id)
        if kind == "input_audio_buffer.clear":
            return ClearBuffer(event_id)
        if kind == "session.update":
            return UpdateSession(_ga_update(_object(body.get("session"), "session"), config), Dialect.GA, event_id)
        if kind == "transcription_session.update":
            return UpdateSession(_beta_update(_object(body.get("session"), "session"), config), Dialect.BETA, event_id)
    except Problem as problem:
        problem.event_id = event_id
        raise
    known = "session.update, transcription_session.update, input_audio_buffer.append, .commit and .clear"
    why = (
        " (this gateway serves transcription sessions only: no responses, no conversation items)"
        if kind in _CONVERSATION_EVENTS
        else ""
    )
    raise Problem(
        ErrorCode.UNKNOWN_EVENT, f"unknown event type {kind[:64]!r}{why}; the events are {known}", "type", event_id
    )


def _audio(value: Any) -> bytes:
    if not isinstance(value, str):
        raise Problem(ErrorCode.INVALID_VALUE, "'audio' must be a base64 string of pcm16 audio", "audio")
    try:
        pcm = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise Problem(ErrorCode.INVALID_BASE64, "'audio' is not valid base64", "audio") from None
    if len(pcm) % 2:
        raise Problem(
            ErrorCode.INVALID_VALUE,
            f"'audio' holds {len(pcm)} bytes, but pcm16 samples are 2 bytes each: send whole samples",
            "audio",
        )
    return pcm


def _object(value: Any, param: str, nullable: bool = False) -> dict[str, Any]:
    if value is None and nullable:
        return {}
    if not isinstance(value, dict):
        raise Problem(ErrorCode.INVALID_VALUE, f"'{param}' must be an object", param)
    return value


def _ga_update(session: dict[str, Any], config: SessionConfig) -> SessionConfig:
    kind = session.get("type", "transcription")
    if kind != "transcription":
        raise Problem(
            ErrorCode.UNSUPPORTED,
            f"session.type must be 'transcription': this gateway serves transcription sessions only, got {kind!r}",
            "session.type",
        )
    audio = _object(session.get("audio"), "session.audio", nullable=True)
    source = _object(audio.get("input"), "session.audio.input", nullable=True)
    if "format" in source:
        _check_format(_object(source["format"], "session.audio.input.format"), "session.audio.input.format")
    if "transcription" in source:
        config = _transcription(source["transcription"], config, "session.audio.input.transcription")
    if "turn_detection" in source:
        config = replace(
            config, turn_detection=_turns(source["turn_detection"], config, "session.audio.input.turn_detection")
        )
    return config


def _beta_update(session: dict[str, Any], config: SessionConfig) -> SessionConfig:
    form = session.get("input_audio_format", "pcm16")
    if form != "pcm16":
        raise Problem(
            ErrorCode.UNSUPPORTED,
            f"input_audio_format must be 'pcm16' (24 kHz, mono, little-endian), got {form!r}",
            "session.input_audio_format",
        )
    if "input_audio_transcription" in session:
        config = _transcription(session["input_audio_transcription"], config, "session.input_audio_transcription")
    if "turn_detection" in session:
        config = replace(config, turn_detection=_turns(session["turn_detection"], config, "session.turn_detection"))
    return config


def _check_format(form: dict[str, Any], param: str) -> None:
    kind = form.get("type", "audio/pcm")
    if kind != "audio/pcm":
        raise Problem(
            ErrorCode.UNSUPPORTED, f"the audio format must be 'audio/pcm' (pcm16), got {kind!r}", f"{param}.type"
        )
    rate = form.get("rate", RATE)
    if rate != RATE:
        raise Problem(
            ErrorCode.INVALID_VALUE,
            f"the audio rate must be {RATE} (pcm16 at 24 kHz, as the Realtime API defines it), got {rate!r}",
            f"{param}.rate",
        )


def _transcription(value: Any, config: SessionConfig, param: str) -> SessionConfig:
    fields = _object(value, param, nullable=True)
    model = fields.get("model", config.model)
    if not isinstance(model, str) or not model:
        raise Problem(
            ErrorCode.INVALID_VALUE, f"model must be a model name (see GET /v1/models), got {model!r}", f"{param}.model"
        )
    language = fields.get("language", config.language)
    if language is not None and not isinstance(language, str):
        raise Problem(
            ErrorCode.INVALID_VALUE,
            f"language must be a language code such as 'en', got {language!r}",
            f"{param}.language",
        )
    prompt = fields.get("prompt", config.prompt)
    if prompt is not None and not isinstance(prompt, str):
        raise Problem(ErrorCode.INVALID_VALUE, f"prompt must be a string, got {prompt!r}", f"{param}.prompt")
    return replace(config, model=model, language=language or None, prompt=prompt or "")


def _turns(value: Any, config: SessionConfig, param: str) -> ServerVad | None:
    if value is None:
        return None
    fields = _object(value, param)
    kind = fields.get("type", "server_vad")
    if kind != "server_vad":
        raise Problem(
            ErrorCode.UNSUPPORTED,
            f"turn_detection.type must be 'server_vad' (or turn_detection null), got {kind!r}",
            f"{param}.type",
        )
    vad = config.turn_detection or ServerVad()
    threshold = fields.get("threshold", vad.threshold)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
        raise Problem(
            ErrorCode.INVALID_VALUE, f"threshold must be a number from 0 to 1, got {threshold!r}", f"{param}.threshold"
        )
    values = {}
    for name in ("prefix_padding_ms", "silence_duration_ms"):
        number = fields.get(name, getattr(vad, name))
        if isinstance(number, bool) or not isinstance(number, int) or not 0 <= number <= 10_000:
            raise Problem(
                ErrorCode.INVALID_VALUE, f"{name} must be an integer from 0 to 10000, got {number!r}", f"{param}.{name}"
            )
        values[name] = number
    return ServerVad(float(threshold), **values)


# --- server events ------------------------------------------------------------------------


def session_event(verb: str, config: SessionConfig, session_id: str, dialect: Dialect) -> dict[str, Any]:
    """``session.created`` / ``session.updated`` (``verb``), or the beta ``transcription_session.*``, with
    the effective configuration (no noise reduction, no logprobs: the hub has neither)."""
    vad = config.turn_detection
    turns = None if vad is None else {"type": "server_vad", **asdict(vad)}
    transcription = {"model": config.model, "language": config.language, "prompt": config.prompt}
    if dialect is Dialect.BETA:
        session: dict[str, Any] = {
            "id": session_id,
            "object": "realtime.transcription_session",
            "modalities": ["text"],
            "input_audio_format": "pcm16",
            "input_audio_transcription": transcription,
            "turn_detection": turns,
            "input_audio_noise_reduction": None,
            "include": [],
        }
        return {"type": f"transcription_session.{verb}", "session": session}
    source = {
        "format": {"type": "audio/pcm", "rate": RATE},
        "transcription": transcription,
        "turn_detection": turns,
        "noise_reduction": None,
    }
    session = {
        "id": session_id,
        "object": "realtime.transcription_session",
        "type": "transcription",
        "audio": {"input": source},
        "include": [],
    }
    return {"type": f"session.{verb}", "session": session}


def error_event(problem: Problem) -> dict[str, Any]:
    return {"type": "error", "error": problem.body()}


def cleared_event() -> dict[str, Any]:
    return {"type": "input_audio_buffer.cleared"}


# --- turns: a hub session's events as the API's items ------------------------------------------


class _Item:
    """One user item: the audio of one turn, its final text so far."""

    def __init__(self, item_id: str, start: float) -> None:
        self.id, self.start = item_id, start
        self.finals: list[str] = []
        self.end: float | None = None

    @property
    def text(self) -> str:
        return join_text(self.finals)


class Turns:
    """Which item each hub event belongs to, and the server events it makes.

    An item is *open* while its audio comes in (from the first audio after a commit without turn
    detection; from ``speech_started`` with it), *committed* by the client's commit or by the hub's
    ``speech_stopped``, and *completed* by the hub's ``utterance`` or, at the latest, when the hub session
    ends. Finals go to the oldest item not yet completed. Times are seconds of the connection's audio:
    a hub session's ``at`` counts from that session's start, ``session_opened`` says where that was."""

    def __init__(self, new_id: Callable[[], str], manual: bool, rate: int = RATE) -> None:
        self.new_id, self.manual, self.rate = new_id, manual, rate
        self.samples = 0  # input samples sent to the hub in all
        self.buffered = 0  # input samples since the last commit: what a commit would commit
        self.offset = 0.0  # where the current hub session's audio begins
        self.open: _Item | None = None
        self.committed: deque[_Item] = deque()
        self.previous: str | None = None  # the last committed item's id
        self.discarding = False  # a clear dropped the open item: its late finals are dropped too

    @property
    def now(self) -> float:
        return self.samples / self.rate

    def session_opened(self) -> None:
        self.offset = self.now

    def appended(self, samples: int) -> list[dict[str, Any]]:
        """``samples`` more input samples went to the hub session."""
        if self.manual and self.open is None:
            self.open = _Item(self.new_id(), self.now)
        self.samples += samples
        self.buffered += samples
        return []

    def commit(self) -> list[dict[str, Any]]:
        """The client's commit: the open item (or one for the audio since the last commit) is committed.
        The connection then ends the hub session, so that the item's last words are decoded at once."""
        if self.buffered * 1000 < MIN_COMMIT_MS * self.rate:
            raise Problem(
                ErrorCode.COMMIT_EMPTY,
                f"buffer too small: a commit needs at least {MIN_COMMIT_MS} ms of audio, "
                f"the buffer has {self.buffered * 1000 / self.rate:.2f} ms",
            )
        item = self.open or _Item(self.new_id(), self.now - self.buffered / self.rate)
        self.open = None
        self.buffered = 0
        return [self._commit(item, self.now)]

    def clear(self) -> list[dict[str, Any]]:
        """The client's clear: the open item's audio is dropped (committed items still complete)."""
        self.open = None
        self.buffered = 0
        self.discarding = True
        return [cleared_event()]

    def hub_event(self, event: StreamEvent) -> list[dict[str, Any]]:
        if event.kind == "final":
            return self._final(event.text)
        if self.manual:  # without turn detection, the client's commits make the items
            return []
        at = self.offset + event.at
        if event.kind == "speech_started":
            if self.open is None:
                self.open = _Item(self.new_id(), at)
            return [{"type": "input_audio_buffer.speech_started", "item_id": self.open.id, "audio_start_ms": _ms(at)}]
        if event.kind == "speech_stopped":
            item = self.open or _Item(self.new_id(), at)
            self.open = None
            self.buffered = max(0, self.samples - round(at * self.rate))
            stopped = {"type": "input_audio_buffer.speech_stopped", "item_id": item.id, "audio_end_ms": _ms(at)}
            return [stopped, self._commit(item, at)]
        if event.kind == "utterance" and self.committed:
            # the utterance that ended at ``at`` is complete; so is any later item that ended by then (a hub
            # that fell behind may decode two utterances as one, whose text then goes to the first)
            first = self.committed.popleft()
            events = [_completed(first, event.text.strip() or first.text)]
            while self.committed and (self.committed[0].end or 0.0) <= at + AT_TOLERANCE_S:
                item = self.committed.popleft()
                events.append(_completed(item, item.text))
            return events
        return []

    def session_ended(self, problem: Problem | None = None) -> list[dict[str, Any]]:
        """The hub session is over (closed by a commit, a clear, a new model, or by the hub itself, e.g. after
        silence): the open item is committed if it holds enough audio (its words were decoded), and every
        committed item completes with its finals (or fails with the session's ``problem``)."""
        events = []
        if self.open is not None and self.buffered * 1000 >= MIN_COMMIT_MS * self.rate:
            events.append(self._commit(self.open, self.now))
        events += [
            _completed(item, item.text) if problem is None else _failed(item, problem) for item in self.committed
        ]
        self.committed.clear()
        self.open = None
        self.buffered = 0
        self.discarding = False
        return events

    def _commit(self, item: _Item, end: float) -> dict[str, Any]:
        item.end = end
        self.committed.append(item)
        event = {"type": "input_audio_buffer.committed", "item_id": item.id, "previous_item_id": self.previous}
        self.previous = item.id
        return event

    def _final(self, text: str) -> list[dict[str, Any]]:
        if self.committed:
            item = self.committed[0]
        elif self.discarding:
            return []
        else:
            if self.open is None:  # a hub without VAD: its finals make the item
                self.open = _Item(self.new_id(), self.offset)
            item = self.open
        before = item.text
        item.finals.append(text)
        delta = item.text[len(before) :]
        if not delta:
            return []
        return [
            {
                "type": "conversation.item.input_audio_transcription.delta",
                "item_id": item.id,
                "content_index": 0,
                "delta": delta,
            }
        ]


def _ms(seconds: float) -> int:
    return max(0, round(seconds * 1000))


def _completed(item: _Item, transcript: str) -> dict[str, Any]:
    seconds = max(0.0, (item.end or item.start) - item.start)
    return {
        "type": "conversation.item.input_audio_transcription.completed",
        "item_id": item.id,
        "content_index": 0,
        "transcript": transcript,
        "usage": {"type": "duration", "seconds": round(seconds, 3)},
    }


def _failed(item: _Item, problem: Problem) -> dict[str, Any]:
    error = {"type": problem.kind, "code": problem.code, "message": problem.message, "param": problem.param}
    return {
        "type": "conversation.item.input_audio_transcription.failed",
        "item_id": item.id,
        "content_index": 0,
        "error": error,
    }
