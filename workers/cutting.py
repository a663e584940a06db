"""Where one long recording is cut into pieces: in a pause the VAD hears, else at the quietest 100 ms.

A plan is a partition of the audio: piece ``k`` ends exactly where piece ``k + 1`` starts, the first
starts at sample 0 and the last ends at the last sample. Every sample is therefore decoded once, in one
piece: no stretch is lost between pieces and none is decoded twice, so no word can be doubled or dropped
at a seam by an overlap or a gap. What is left is a word cut in two, and the cut's place rules that out:

- the search for piece ``k``'s end looks at the second half of its longest allowed extent,
  ``[start + piece / 2, start + piece]``, so a piece is never longer than ``piece`` samples (one
  Whisper window at the default 30 s) and never shorter than half of it (the last piece excepted);
- inside that window the cut goes in the middle of the longest stretch the VAD calls non-speech (ties:
  the latest), and only a stretch of at least ``MIN_GAP`` counts, so the cut is at least half of that
  away from any speech the VAD heard;
- only where the VAD hears speech across the whole window (someone talks for 15 s without a 100 ms
  pause, or a tone or noise the VAD takes for speech) does the cut fall at the quietest 100 ms of the
  window (``quietest``): between words, the energy of speech drops; inside a word it does not.

The functions here are pure (``find_cut``, ``quietest``, ``overlaps``) or take the VAD as an argument
(``plan``), so they are tested without a model; ``silero_vad`` is the VAD faster-whisper ships.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from enum import Enum

import numpy as np

from hub.protocol import SAMPLE_RATE

Span = tuple[int, int]  # [start, end) in samples
Vad = Callable[[np.ndarray], list[Span]]  # the speech spans of a stretch of audio, relative to its start

MIN_GAP = SAMPLE_RATE // 10  # the shortest pause a cut may go in: 100 ms, so the cut is >= 50 ms from speech
QUIET_WINDOW = SAMPLE_RATE // 10  # the fallback cut's window: 100 ms
QUIET_HOP = SAMPLE_RATE // 100  # ... tried every 10 ms


class Cut(str, Enum):
    """How a piece's end was chosen."""

    PAUSE = "pause"  # in a pause the VAD heard
    QUIET = "quiet"  # no pause: at the quietest 100 ms
    END = "end"  # the end of the audio


@dataclass(frozen=True)
class Piece:
    """One piece of the plan: samples ``[start, end)``; ``speech`` is whether the VAD heard any in it
    (a piece without speech is not decoded: Whisper invents words in silence)."""

    start: int
    end: int
    speech: bool
    cut: Cut

    def to_dict(self) -> dict[str, object]:
        return {"start": self.start, "end": self.end, "speech": self.speech, "cut": self.cut.value}


def find_cut(speech: Sequence[Span], lo: int, hi: int, min_gap: int = MIN_GAP) -> int | None:
    """The middle of the longest non-speech stretch of ``[lo, hi)`` of at least ``min_gap`` samples (ties:
    the latest), or None when there is none. ``speech`` is sorted by start; spans may reach outside."""
    best: Span | None = None
    cursor = lo
    for start, end in [*speech, (hi, hi)]:
        gap = (cursor, min(max(start, cursor), hi))
        if gap[1] - gap[0] >= min_gap and (best is None or gap[1] - gap[0] >= best[1] - best[0]):
            best = gap
        cursor = max(cursor, end)
        if cursor >= hi:
            break
    return None if best is None else (best[0] + best[1]) // 2


def quietest(pcm: np.ndarray, lo: int, hi: int, window: int = QUIET_WINDOW, hop: int = QUIET_HOP) -> int:
    """The middle of the ``window`` of ``pcm[lo:hi]`` with the least energy, tried every ``hop`` samples
    (ties: the latest)."""
    if hi - lo <= window:
        return (lo + hi) // 2
    squares = np.concatenate(([0.0], np.cumsum(np.square(pcm[lo:hi], dtype=np.float64))))
    starts = np.arange(0, hi - lo - window + 1, hop)
    energy = squares[starts + window] - squares[starts]
    last = len(energy) - 1 - int(np.argmin(energy[::-1]))
    return lo + int(starts[last]) + window // 2


def overlaps(speech: Sequence[Span], start: int, end: int) -> bool:
    """Whether any span of ``speech`` reaches into ``[start, end)``."""
    return any(s < end and e > start for s, e in speech)


def plan(pcm: np.ndarray, piece: int, vad: Vad) -> Iterator[Piece]:
    """Cut ``pcm`` into pieces of at most ``piece`` samples, yielding each as soon as its end is known.

    The VAD runs on one piece's extent at a time (``[start, start + piece)``), so the first piece is
    known after a fraction of the whole pass and its decoding can start while the rest is planned; the
    next extent starts at the cut, so no more than half a piece is heard twice."""
    if piece < 2 * MIN_GAP:
        raise ValueError(f"a piece must be at least {2 * MIN_GAP} samples, got {piece}")
    total, start = int(pcm.size), 0
    while total - start > piece:
        lo, hi = start + piece // 2, start + piece
        speech = [(start + s, start + e) for s, e in vad(pcm[start:hi])]
        cut, how = find_cut(speech, lo, hi), Cut.PAUSE
        if cut is None:
            cut, how = quietest(pcm, lo, hi), Cut.QUIET
        yield Piece(start, cut, overlaps(speech, start, cut), how)
        start = cut
    yield Piece(start, total, bool(vad(pcm[start:total])), Cut.END)


def all_speech(pcm: np.ndarray) -> list[Span]:
    """The VAD of a worker without faster-whisper (a FunASR-only install): everything is speech, so every cut
    falls at the quietest 100 ms and every piece is decoded."""
    return [(0, int(pcm.size))]


def the_vad() -> Vad:
    """Silero where faster-whisper is installed, else ``all_speech``."""
    try:
        import faster_whisper.vad  # noqa: F401
    except ImportError:
        return all_speech
    return silero_vad


def silero_vad(pcm: np.ndarray) -> list[Span]:
    """The speech the Silero VAD bundled with faster-whisper hears in ``pcm`` (no padding around it: the
    cut keeps its own distance, ``MIN_GAP``)."""
    from faster_whisper.vad import VadOptions, get_speech_timestamps

    options = VadOptions(min_silence_duration_ms=MIN_GAP * 1000 // SAMPLE_RATE, speech_pad_ms=0)
    return [(int(s["start"]), int(s["end"])) for s in get_speech_timestamps(pcm, options)]
