"""Transcription results as frozen dataclasses, built once at the edge from wire dicts."""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any


def _unspaced(char: str) -> bool:
    """Scripts written without spaces between words (CJK ideographs, kana, hangul syllables)."""
    name = unicodedata.name(char, "")
    return name.startswith(("CJK", "HIRAGANA", "KATAKANA", "HANGUL")) or "IDEOGRAPH" in name


def join_text(parts: Iterable[str]) -> str:
    """Join segment texts: with a space, except between two characters of a script written without one."""
    out = ""
    for part in (p.strip() for p in parts):
        if not part:
            continue
        if out and not (_unspaced(out[-1]) and _unspaced(part[0])):
            out += " "
        out += part
    return out


@dataclass(frozen=True)
class Word:
    """One word with its timing, present when the request asked for ``word_timestamps``."""

    start: float
    end: float
    word: str
    probability: float = 0.0


@dataclass(frozen=True)
class Segment:
    """One decoded stretch of speech; times are seconds from the start of the audio."""

    start: float
    end: float
    text: str
    words: tuple[Word, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(data: dict[str, Any]) -> Segment:
        return Segment(
            start=float(data["start"]),
            end=float(data["end"]),
            text=str(data["text"]),
            words=tuple(Word(**w) for w in data.get("words", ())),
        )


@dataclass(frozen=True)
class Transcript:
    """The whole answer to one request.

    ``queue_ms`` is the time the job waited in the supervisor for a free worker;
    ``inference_ms`` the time the worker spent running the model.
    """

    text: str
    segments: tuple[Segment, ...] = ()
    language: str | None = None
    duration: float = 0.0
    worker: str | None = None
    queue_ms: float = 0.0
    inference_ms: float = 0.0
    provider: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(data: dict[str, Any]) -> Transcript:
        return Transcript(
            text=str(data.get("text", "")),
            segments=tuple(Segment.from_dict(s) for s in data.get("segments", ())),
            language=data.get("language"),
            duration=float(data.get("duration", 0.0)),
            worker=data.get("worker"),
            queue_ms=float(data.get("queue_ms", 0.0)),
            inference_ms=float(data.get("inference_ms", 0.0)),
            provider=data.get("provider"),
            extra=dict(data.get("extra", {})),
        )
