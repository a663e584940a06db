"""The response formats of OpenAI's transcription API, as pure functions of a ``Transcript``."""

from __future__ import annotations

from typing import Any

from hub.results import Transcript

FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
MEDIA_TYPES = {
    "json": "application/json",
    "verbose_json": "application/json",
    "text": "text/plain; charset=utf-8",
    "srt": "application/x-subrip; charset=utf-8",
    "vtt": "text/vtt; charset=utf-8",
}


def timestamp(seconds: float, separator: str) -> str:
    """``HH:MM:SS,mmm`` (SRT) or ``HH:MM:SS.mmm`` (VTT)."""
    millis = max(0, round(seconds * 1000))
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"


def srt(t: Transcript) -> str:
    blocks = [
        f"{i}\n{timestamp(s.start, ',')} --> {timestamp(s.end, ',')}\n{s.text.strip()}\n"
        for i, s in enumerate(t.segments, 1)
    ]
    return "\n".join(blocks)


def vtt(t: Transcript) -> str:
    blocks = [f"{timestamp(s.start, '.')} --> {timestamp(s.end, '.')}\n{s.text.strip()}\n" for s in t.segments]
    return "WEBVTT\n\n" + "\n".join(blocks)


def verbose(t: Transcript, task: str, words: bool) -> dict[str, Any]:
    """OpenAI's ``verbose_json``: the text, language, duration and segments; words when asked for."""
    body: dict[str, Any] = {
        "task": task,
        "language": t.language or "",
        "duration": t.duration,
        "text": t.text,
        "segments": [
            {
                "id": i,
                "seek": 0,
                "start": s.start,
                "end": s.end,
                "text": s.text,
                "tokens": [],
                "temperature": 0.0,
                "avg_logprob": 0.0,
                "compression_ratio": 0.0,
                "no_speech_prob": 0.0,
            }
            for i, s in enumerate(t.segments)
        ],
    }
    if words:
        body["words"] = [{"word": w.word.strip(), "start": w.start, "end": w.end} for s in t.segments for w in s.words]
    return body


def render(t: Transcript, response_format: str, task: str, words: bool) -> str | dict[str, Any]:
    """The body for ``response_format``: a dict for the JSON formats, text for the others."""
    if response_format == "json":
        return {"text": t.text}
    if response_format == "verbose_json":
        return verbose(t, task, words)
    if response_format == "text":
        return t.text + "\n"
    return srt(t) if response_format == "srt" else vtt(t)
